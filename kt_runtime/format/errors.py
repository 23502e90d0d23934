"""The errors of the format room: one root for every problem a user can fix, one subclass per kind.

Every message starts with the file (or field, or option) it is about and says what to do.
`FixableError` is the root that the converter's errors derive from too (convert/errors.py): the
command line maps it to exit 2 once (convert/cli/error_messages.py), a library caller catches it as
the ValueError it is. `PackedFormatError` is "a file is not what the format says"; its subclasses
say which rule.
"""
from __future__ import annotations


class FixableError(ValueError):
    """A problem with an input, an argument, a file or the machine that the user can fix; the message
    names it and says how."""


class PackedFormatError(FixableError):
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
    """An entry is a link, a special file, a file with several names, of the wrong kind, or outside its
    root: it is left untouched."""


class InputFileError(PackedFormatError):
    """A file an input names is outside its folder, not a regular file, too big, or unreadable."""


class FieldError(PackedFormatError):
    """A JSON field is missing, of the wrong type, or out of range."""
