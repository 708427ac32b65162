"""Command-line entry points: ``deepseekmoe-convert`` (`convert`) and ``deepseekmoe-train`` (`train`).

Each module only parses arguments, reports versions and devices, calls the library and maps its errors to exit
statuses; ``python -m convert`` and ``python train.py`` in a checkout are thin wrappers around them.
"""
