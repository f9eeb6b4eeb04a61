"""Errors a user can act on.

Every message starts with one plain sentence that says what is wrong and how to fix it;
the training job writes it first in the failure file and the server sends it to the client.
"""


class ClassifierError(Exception):
    """Base of the errors whose message is meant for the user, not for a developer."""


class ImageDecodeError(ClassifierError):
    """The bytes are not an image we can read (corrupt, truncated, empty, unsupported)."""


class ImageTooLargeError(ClassifierError):
    """The image has more pixels than the configured limit (decompression bomb guard)."""


class WeightsError(ClassifierError):
    """Pretrained weights are missing or do not fit the architecture."""


class ArtifactError(ClassifierError):
    """A model directory is missing, incomplete or of an unknown format."""
