"""The errors of the format room: one base class, one subclass per kind of problem.

Every message starts with the file (or field) it is about and says what to do. Catch
`PackedFormatError` for "a file is not what the format says"; the subclasses say which rule.
"""
from __future__ import annotations


class PackedFormatError(ValueError):
    """A file read or written under the format's rules breaks one of them."""


class SafetensorsFormatError(PackedFormatError):
    """Malformed, truncated or unreadable safetensors file.

    ``str()`` starts with the file path, says what is wrong (which tensor / offset) and what to do.
    """


class SafetensorsChangedError(SafetensorsFormatError):
    """The file shrank or was modified after it was opened (another program writes it)."""


class ManifestError(PackedFormatError):
    """kt_manifest.json is unreadable, malformed, or contradicts itself."""


class PackedWeightsError(PackedFormatError):
    """The packed output is missing, damaged, or does not match its manifest."""


class UnsafePathError(PackedFormatError):
    """An output entry is a link or a special file (or of the wrong kind): it is left untouched."""


class InputFileError(PackedFormatError):
    """A file an input names is outside its folder, not a regular file, too big, or unreadable."""


class FieldError(PackedFormatError):
    """A JSON field is missing, of the wrong type, or out of range."""
