"""Bearer-token authentication of the client API: a server interceptor.

With a token, every call must carry the metadata `authorization: Bearer <token>`; any other call
is answered UNAUTHENTICATED before it reaches the service. Tokens are compared in constant time.
"""
from __future__ import annotations

import hmac

import grpc

METADATA_KEY = "authorization"  # gRPC metadata keys are lower case


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The metadata a client sends with every call to a server that has `token`."""
    return ((METADATA_KEY, f"Bearer {token}"),)


class BearerTokenAuth(grpc.ServerInterceptor):
    def __init__(self, token: str):
        if not token:
            raise ValueError("a bearer token must not be empty")
        self._expected = f"Bearer {token}".encode()

    def refusal(self, metadata) -> str | None:
        """Why a call with this invocation metadata is refused, or None when its token is right."""
        supplied = dict(metadata or ()).get(METADATA_KEY)
        if supplied is None:
            return ("this server needs a token: send the metadata `authorization: Bearer <token>` "
                    "(pie submit --token, or the PIE_TOKEN environment variable)")
        if not hmac.compare_digest(supplied.encode(), self._expected):
            return "the bearer token is wrong; ask the server's operator for the right one"
        return None

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: UNIMPLEMENTED, as without a token
        refusal = self.refusal(handler_call_details.invocation_metadata)
        return handler if refusal is None else _denying(handler, refusal)


def _denying(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""

    def deny(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)
