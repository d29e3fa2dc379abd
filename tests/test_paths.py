"""Whether one place holds another, as given and where links lead."""

from __future__ import annotations

import os

from pipeline.io.paths import path_within, same_path


def test_local_paths_as_given_and_where_links_lead(tmp_path):
    (tmp_path / "data" / "stack.zarr").mkdir(parents=True)
    os.symlink(tmp_path / "data", tmp_path / "alias")
    assert same_path(tmp_path / "data", f"{tmp_path}/data/")
    assert same_path(tmp_path / "alias" / "stack.zarr", tmp_path / "data" / "stack.zarr")  # through the link
    assert path_within(tmp_path / "data" / "stack.zarr", tmp_path / "alias")
    assert path_within(tmp_path / "data" / "stack.zarr", tmp_path) and not path_within(tmp_path, tmp_path / "data")
    assert not path_within(tmp_path / "data2", tmp_path / "data")  # a name that only starts alike
    assert not same_path(tmp_path / "data", tmp_path / "data" / "stack.zarr")


def test_urls_as_text_and_file_urls_as_their_paths(tmp_path):
    assert path_within("s3://bucket/survey/stack.zarr", "s3://bucket/survey/")
    assert not path_within("s3://bucket/survey2", "s3://bucket/survey")
    assert same_path("s3://bucket/k.zarr/", "s3://bucket/k.zarr")
    assert not path_within(tmp_path / "s3", "s3://bucket")  # a local path is never inside a URL
    assert same_path(f"file://{tmp_path}/k.zarr", tmp_path / "k.zarr")
