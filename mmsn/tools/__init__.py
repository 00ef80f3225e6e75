"""mmsn's command-line tools, as modules of the installed package: ``python -m
mmsn.tools.train`` or the console script ``mmsn-train`` (likewise ``test``, ``sn2mm``,
``plot_ratios``, ``harden_ratios``, ``batch_average``, ``export_onnx``). A checkout's
``tools/*.py`` and ``tools/dist_*.sh`` run the same code. ``python -m mmsn.tools.compile_check`` compiles the
kernels' launches ahead of time for GPUs (docs/kernels.md)."""
