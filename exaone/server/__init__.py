"""The OpenAI-compatible server (`exaone serve`).

protocol (request models, the one response renderer) -> backend (checkpoint + engine: request to
prompt ids and SamplingParams, engine records to typed pieces) -> app (routes, auth, limits,
streaming, billing) -> cli. Metering lives in ledger / limits / pricing (with keys_cli and
usage_cli); metrics in metrics; the chat page in playground.html. Nothing here is imported by
`exaone` itself: the server's dependencies are the `serve` extra.
"""
