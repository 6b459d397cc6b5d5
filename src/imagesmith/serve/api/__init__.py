"""The HTTP API as FastAPI routers over one set of services (:mod:`.context`): ``ops`` (health, metrics, models,
the studio page), ``files`` (uploads and outputs), ``jobs`` (the native job API, SSE and WebSocket progress),
``queue`` (the queue as a whole, admin), ``a1111`` (the A1111-compatible ``/sdapi/v1`` API, its list routes and the
ControlNet extension's routes). Every route names its caller with one dependency (``context.Caller``), which HTTP
and WebSocket routes share, rate limit included; :func:`imagesmith.serve.app.create_app` puts them together."""
