if __name__ != "kt_convert.convert":  # this folder reached on sys.path by its own name: a second copy
    raise ImportError(f"{__name__!r} is the folder of kt_convert.convert in a source tree: "
                      "import kt_convert.convert (pip install -e . makes it importable)")

__version__ = "0.1.0"
