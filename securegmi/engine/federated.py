"""The federated methods: clients and a server exchanging protocol messages through a transport,
with DP ledgers and CKKS keys when the protocol asks for them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from securegmi.config import SimulationConfig
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.crypto.envelope import decrypt
from securegmi.crypto.keys import SecretContext
from securegmi.crypto.params import CkksParameters
from securegmi.engine.client import FedGMIClient
from securegmi.engine.dp_client import ClientPrivacy, DpFedGMIClient
from securegmi.engine.loop import Loop, PlanCallback, client_settings, new_model
from securegmi.engine.rundir import LEDGERS, PLAN, PROTOCOL, TRANSCRIPT
from securegmi.engine.secure_client import SecureDpFedGMIClient
from securegmi.engine.secure_server import SecureAggregationServer
from securegmi.engine.seeding import derive_seed
from securegmi.engine.server import AggregationServer
from securegmi.engine.transport import ClientEndpoint, InProcessTransport, ServerEndpoint
from securegmi.errors import RunAbortedError
from securegmi.privacy.calibration import DpPlan, calibrate
from securegmi.privacy.dpsgd import DpSgdConfig
from securegmi.privacy.ledger import PrivacyBudget
from securegmi.protocol import ProtocolSpec, TranscriptWriter
from securegmi.protocol.fields import field_array

ProtocolBuilder = Callable[..., ProtocolSpec]


def run_federated(
    loop: Loop, builder: ProtocolBuilder, on_plan: PlanCallback | None
) -> tuple[list[MixtureOfVAEs], list[np.ndarray], float, ProtocolSpec, dict[str, Any] | None]:
    config, data = loop.config, loop.data
    settings = client_settings(config)
    reference = new_model(config, data)
    spec = builder(
        components=reference.n_components, parameters=reference.parameter_count(), top_b=config.top_b
    )
    if loop.run_dir is not None:
        loop.run_dir.write_json(PROTOCOL, {"name": spec.name, "dims": dict(spec.dims)})
    plan = dp_plan(config) if config.epsilon is not None else None
    secure = config.protocol == "secure"
    if plan is not None:
        if loop.run_dir is not None:
            loop.run_dir.write_json(PLAN, plan.to_dict())
            loop.run_dir.file(LEDGERS).mkdir(exist_ok=True)
        if on_plan is not None:
            on_plan(plan.to_dict())
    # The key ceremony, in-process for a simulation: clients share the secret context, the
    # server gets the public one only.
    keys = SecretContext.generate(CkksParameters(max_clients=max(2, config.clients))) if secure else None
    clients: dict[str, FedGMIClient] = {}
    for i, c in enumerate(data.clients):
        cid = f"client-{i}"
        model = new_model(config, data)
        if plan is None:
            clients[cid] = FedGMIClient(cid, c.x_train, model, settings, spec, config.seed)
            continue
        ledger = loop.run_dir.file(LEDGERS) / f"{cid}.json" if loop.run_dir is not None else None
        noise_seed = derive_seed(config.seed, 0x5EED, i) if config.dp_noise == "seeded" else None
        privacy = ClientPrivacy(plan, config.dp_batch_normaliser, ledger, noise_seed)
        if keys is None:
            clients[cid] = DpFedGMIClient(cid, c.x_train, model, settings, spec, config.seed, privacy)
        else:
            clients[cid] = SecureDpFedGMIClient(
                cid, c.x_train, model, settings, spec, config.seed, privacy, keys
            )
    k, p = reference.n_components, reference.parameter_count()
    server: AggregationServer | SecureAggregationServer = (
        AggregationServer(reference.get_component_vectors(), spec)
        if keys is None
        else SecureAggregationServer(keys.public(), spec, k, p)
    )
    transcript = TranscriptWriter(loop.run_dir.file(TRANSCRIPT)) if loop.run_dir is not None else None
    transport = InProcessTransport(
        ServerEndpoint(spec, transcript),
        {cid: ClientEndpoint(cid, client.handle, spec) for cid, client in clients.items()},
    )
    uplink_total = 0
    try:
        for t in range(config.rounds):
            t0 = time.perf_counter()
            broadcast = server.broadcast(t, loop.temperature(t))
            exchange = transport.exchange({cid: broadcast for cid in clients})
            if not exchange.replies:
                raise RunAbortedError(
                    f"round {t}: every client refused ({next(iter(exchange.refused.values()))})"
                )
            rejected = server.aggregate(exchange.replies) or {}
            uplink = sum(field_array(f).nbytes for m in exchange.replies.values() for f in m.payload.values())
            uplink_total += uplink
            # Evaluate what a client would hold after decrypting and dividing this aggregate
            # (the harness plays a client here; the server never decrypts).
            sums, masses = _aggregate_in_clear(server, keys, k, p)
            reference.set_component_vectors(_divide(sums, masses, reference))
            loop.finish_round(
                t,
                t0,
                [reference] * len(clients),
                [c.pi for c in clients.values()],
                uplink,
                len(exchange.refused) + len(rejected),
            )
    finally:
        if transcript is not None:
            transcript.close()
    per_client_round = uplink_total / max(1, config.rounds * len(clients))
    summary = None
    if plan is not None:
        ledgers = [c.ledger for c in clients.values() if isinstance(c, DpFedGMIClient)]
        summary = {
            "target": plan.epsilon,
            "delta": plan.delta,
            "max_spent": max(ledger.spent for ledger in ledgers),
            "max_spent_pld": max(ledger.spent_pld() for ledger in ledgers),
            "sgd_noise_multiplier": plan.sgd_noise_multiplier,
            "count_noise_multiplier": plan.count_noise_multiplier,
            "secure_rng": False,
            "noise": config.dp_noise,
        }
    return [reference] * len(clients), [c.pi for c in clients.values()], per_client_round, spec, summary


def _aggregate_in_clear(
    server: AggregationServer | SecureAggregationServer, keys: SecretContext | None, k: int, p: int
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(server, AggregationServer):
        return server.sums, server.masses
    assert keys is not None and server.sums is not None and server.masses is not None
    return decrypt(keys, server.sums).reshape(k, p), decrypt(keys, server.masses)


def dp_plan(config: SimulationConfig) -> DpPlan:
    assert config.epsilon is not None
    q = config.sample_rate
    steps_per_epoch = DpSgdConfig(0.0, config.clip_norm, q, config.dp_batch_normaliser).steps_per_epoch
    return calibrate(
        PrivacyBudget(config.epsilon, config.delta),
        rounds=config.rounds,
        steps_per_round=config.local_epochs * steps_per_epoch,
        sample_rate=q,
        clip_norm=config.clip_norm,
        count_share=config.count_share,
    )


def _divide(sums: np.ndarray, masses: np.ndarray, current: MixtureOfVAEs) -> np.ndarray:
    out = current.get_component_vectors()
    present = masses > 0
    out[present] = sums[present] / masses[present, None]
    return out.astype(np.float32)
