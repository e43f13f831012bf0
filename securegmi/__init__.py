"""securegmi: privacy-enhanced federated learning for probabilistic mixtures (FedGMI)."""

from securegmi.config import SimulationConfig
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.core.vae import VAE
from securegmi.engine.participant import Client
from securegmi.engine.run import RunResult, run_simulation
from securegmi.engine.trained import TrainedMixture, load
from securegmi.errors import (
    BudgetExceededError,
    ConfigError,
    CryptoError,
    DataError,
    PrivacyError,
    ProtocolViolation,
    RunAbortedError,
    RunDirectoryError,
    SecureGMIError,
)
from securegmi.protocol import Message, ProtocolSpec

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "BudgetExceededError",
    "Client",
    "ConfigError",
    "CryptoError",
    "DataError",
    "Message",
    "MixtureOfVAEs",
    "PrivacyError",
    "ProtocolSpec",
    "ProtocolViolation",
    "RunAbortedError",
    "RunDirectoryError",
    "RunResult",
    "SecureGMIError",
    "SimulationConfig",
    "TrainedMixture",
    "load",
    "run_simulation",
]
