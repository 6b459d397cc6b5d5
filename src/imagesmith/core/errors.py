"""Errors a user sees. Each carries one clear line; the CLI prints it and exits non-zero,
the HTTP API maps it to a 4xx JSON error."""

from __future__ import annotations


class ImagesmithError(Exception):
    """Base of every error caused by the user's input or environment (not a bug)."""

    code = "error"
    http_status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split())


class BadRequest(ImagesmithError):
    code = "bad_request"
    http_status = 422


class BadImage(ImagesmithError):
    code = "bad_image"
    http_status = 422


class NotFound(ImagesmithError):
    code = "not_found"
    http_status = 404


class ModelNotFound(NotFound):
    code = "model_not_found"


class UnsafeModelFile(ImagesmithError):
    """A pickle-based model file (.ckpt/.pt/.pth/.bin): refused, never unpickled."""

    code = "unsafe_model_file"
    http_status = 422


class MissingModelFile(ImagesmithError):
    """A file a loader needs is not on disk (e.g. a T5 tokenizer); says which and where to put it."""

    code = "missing_model_file"
    http_status = 422


class UnsupportedModel(ImagesmithError):
    code = "unsupported_model"
    http_status = 422


class Cancelled(ImagesmithError):
    code = "cancelled"
    http_status = 409


class Conflict(ImagesmithError):
    """The resource is in a state that does not allow the change (HTTP 409)."""
    code = "conflict"
    http_status = 409


class Unauthorized(ImagesmithError):
    """The service needs a valid API token for this route."""

    code = "unauthorized"
    http_status = 401


class Forbidden(ImagesmithError):
    """The caller is known but may not do this (an admin-only service route)."""

    code = "forbidden"
    http_status = 403


class TooManyRequests(ImagesmithError):
    """A per-user rate or queue limit of the service."""

    code = "rate_limited"
    http_status = 429


class DatasetError(ImagesmithError):
    code = "bad_dataset"
    http_status = 422
