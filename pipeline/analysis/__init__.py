"""Reading and looking at kernel maps: ``maps`` (KernelMap and ``ds.kernelmap``), ``report``, ``compare``."""
