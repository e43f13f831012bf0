"""securegmi: privacy-enhanced federated learning for probabilistic mixtures (FedGMI)."""

from securegmi.config import SimulationConfig
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.core.vae import VAE
from securegmi.engine.run import RunResult, run_simulation
from securegmi.errors import (
    ConfigError,
    DataError,
    ProtocolViolation,
    RunDirectoryError,
    SecureGMIError,
)
from securegmi.protocol import Message, ProtocolSpec

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "ConfigError",
    "DataError",
    "Message",
    "MixtureOfVAEs",
    "ProtocolSpec",
    "ProtocolViolation",
    "RunDirectoryError",
    "RunResult",
    "SecureGMIError",
    "SimulationConfig",
    "run_simulation",
]
