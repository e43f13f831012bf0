"""The Flower components of securegmi's embedded study, configured by the run config (the
study, the server's run directory and public key) and each SuperNode's node config
(`partition-id`, `state-dir`, and `key-dir` under the secure protocol)."""

from securegmi.adapters.flower_study import configured_client_app, configured_server_app

serverapp = configured_server_app()
clientapp = configured_client_app()
