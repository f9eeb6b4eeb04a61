"""Request errors with the HTTP status a client should see.

Everything a client can cause maps to a 4xx with a message that says what to change; only a
bug in the server is a 500.
"""

from __future__ import annotations

from http import HTTPStatus

from imgcls.errors import ClassifierError, ImageDecodeError, ImageTooLargeError


class RequestError(ClassifierError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = message


def bad_request(message: str) -> RequestError:
    return RequestError(HTTPStatus.BAD_REQUEST, message)


def too_large(message: str) -> RequestError:
    return RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message)


def status_of(exc: BaseException) -> int:
    """The HTTP status for an exception raised while answering a request."""
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, ImageTooLargeError):
        return HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    if isinstance(exc, ImageDecodeError):
        return HTTPStatus.BAD_REQUEST
    status = getattr(exc, "status_code", None)  # sagemaker_inference's errors from a user's inference.py
    if isinstance(status, int) and 400 <= status < 600:
        return status
    if isinstance(exc, MemoryError):
        return HTTPStatus.INSUFFICIENT_STORAGE
    return HTTPStatus.INTERNAL_SERVER_ERROR


def phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
