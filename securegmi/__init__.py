"""securegmi: privacy-enhanced federated learning for probabilistic mixtures (FedGMI).

Everything a user imports is here: the configuration of a simulated study and `simulate`;
the one `Client` (your components, your records, a release policy chosen by its `privacy=`,
a codec chosen by the protocol) and the one `Server`; the protocols by name (`bind_protocol`);
the privacy plans (`calibrate_statistics` for the default private design, `calibrate` for the
em design); `run_federation` to play a federation you built yourself and `save` to write it
as a run directory; the CKKS key ceremony; `audit` and `load` for a finished run; and the
exception tree.

Bring your own model, the default private design::

    plan = securegmi.calibrate_statistics(PrivacyBudget(8.0, 1e-5), clients=8, features=64)
    spec = securegmi.bind_protocol("dp", reference, plan=plan, clients=8)
    clients = [Client(f"site-{i}", reference, loader, spec,
                      privacy=ClientPrivacy(plan, 16.0, slot=i, cohort=8)) for i, loader in ...]
    server = Server(spec, transcript_path=Path("server.transcript.jsonl"))
    securegmi.run_federation(clients, server)
    securegmi.save("runs/mine", clients, server)
"""

# Bound under private names: the package's namespace holds its exports and nothing else.
import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:  # what a type checker and an IDE see; at run time each name loads on first use
    from securegmi._front import PROTOCOLS, audit, bind_protocol, simulate
    from securegmi.config import SimulationConfig
    from securegmi.core.mixture import MixtureOfVAEs
    from securegmi.core.vae import VAE
    from securegmi.crypto.keys import PublicContext, SecretContext
    from securegmi.crypto.params import CkksParameters
    from securegmi.errors import (
        BudgetExceededError,
        ConfigError,
        CryptoError,
        DataError,
        PrivacyError,
        ProtocolViolation,
        RefusalError,
        RunAbortedError,
        RunDirectoryError,
        SecureGMIError,
    )
    from securegmi.federation.client import Client
    from securegmi.federation.driver import FederationRun, run_federation
    from securegmi.federation.local import ClientSettings
    from securegmi.federation.release import ClientPrivacy
    from securegmi.federation.server import RoundOutcome, Server, play_round
    from securegmi.federation.transport import Exchange, InProcessTransport, Transport
    from securegmi.privacy.calibration import DpPlan, PrivateMixturePlan, calibrate, calibrate_statistics
    from securegmi.privacy.ledger import PrivacyBudget
    from securegmi.protocol import Message, ProtocolSpec
    from securegmi.records.audit import AuditReport
    from securegmi.records.trained import TrainedMixture, load
    from securegmi.simulation.own_run import save
    from securegmi.simulation.runner import RunResult

__version__ = "0.1.0"

# Each public name and the module it lives in: `import securegmi` stays cheap (no torch, Opacus
# or dp-accounting until a name is used), so the command line answers `--help` at once.
_EXPORTS = {
    "audit": "securegmi._front",
    "AuditReport": "securegmi.records.audit",
    "bind_protocol": "securegmi._front",
    "BudgetExceededError": "securegmi.errors",
    "calibrate": "securegmi.privacy.calibration",
    "calibrate_statistics": "securegmi.privacy.calibration",
    "CkksParameters": "securegmi.crypto.params",
    "Client": "securegmi.federation.client",
    "ClientPrivacy": "securegmi.federation.release",
    "ClientSettings": "securegmi.federation.local",
    "ConfigError": "securegmi.errors",
    "CryptoError": "securegmi.errors",
    "DataError": "securegmi.errors",
    "DpPlan": "securegmi.privacy.calibration",
    "Exchange": "securegmi.federation.transport",
    "FederationRun": "securegmi.federation.driver",
    "InProcessTransport": "securegmi.federation.transport",
    "load": "securegmi.records.trained",
    "Message": "securegmi.protocol",
    "MixtureOfVAEs": "securegmi.core.mixture",
    "play_round": "securegmi.federation.server",
    "PrivacyBudget": "securegmi.privacy.ledger",
    "PrivacyError": "securegmi.errors",
    "PrivateMixturePlan": "securegmi.privacy.calibration",
    "PROTOCOLS": "securegmi._front",
    "ProtocolSpec": "securegmi.protocol",
    "ProtocolViolation": "securegmi.errors",
    "RefusalError": "securegmi.errors",
    "PublicContext": "securegmi.crypto.keys",
    "RoundOutcome": "securegmi.federation.server",
    "run_federation": "securegmi.federation.driver",
    "RunAbortedError": "securegmi.errors",
    "RunDirectoryError": "securegmi.errors",
    "RunResult": "securegmi.simulation.runner",
    "save": "securegmi.simulation.own_run",
    "SecretContext": "securegmi.crypto.keys",
    "SecureGMIError": "securegmi.errors",
    "Server": "securegmi.federation.server",
    "simulate": "securegmi._front",
    "SimulationConfig": "securegmi.config",
    "TrainedMixture": "securegmi.records.trained",
    "Transport": "securegmi.federation.transport",
    "VAE": "securegmi.core.vae",
}

__all__ = [
    "PROTOCOLS",
    "VAE",
    "AuditReport",
    "BudgetExceededError",
    "CkksParameters",
    "Client",
    "ClientPrivacy",
    "ClientSettings",
    "ConfigError",
    "CryptoError",
    "DataError",
    "DpPlan",
    "Exchange",
    "FederationRun",
    "InProcessTransport",
    "Message",
    "MixtureOfVAEs",
    "PrivacyBudget",
    "PrivacyError",
    "PrivateMixturePlan",
    "ProtocolSpec",
    "ProtocolViolation",
    "PublicContext",
    "RefusalError",
    "RoundOutcome",
    "RunAbortedError",
    "RunDirectoryError",
    "RunResult",
    "SecretContext",
    "SecureGMIError",
    "Server",
    "SimulationConfig",
    "TrainedMixture",
    "Transport",
    "audit",
    "bind_protocol",
    "calibrate",
    "calibrate_statistics",
    "load",
    "play_round",
    "run_federation",
    "save",
    "simulate",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'securegmi' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # once loaded, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
