"""securegmi: privacy-enhanced federated learning for probabilistic mixtures (FedGMI).

Everything a user imports is here: the configuration of a simulated study and `simulate`;
the one `Client` (your components, your records, a release policy chosen by its `privacy=`,
a codec chosen by the protocol) and the one `Server`; the protocols by name; the CKKS key
ceremony; `audit` and `load` for a finished run; and the exception tree.
"""

from securegmi._front import PROTOCOLS, audit, protocol, simulate
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
    RunAbortedError,
    RunDirectoryError,
    SecureGMIError,
)
from securegmi.federation.client import Client
from securegmi.federation.local import ClientSettings
from securegmi.federation.release import ClientPrivacy
from securegmi.federation.server import Server
from securegmi.privacy.calibration import calibrate
from securegmi.privacy.ledger import PrivacyBudget
from securegmi.protocol import Message, ProtocolSpec
from securegmi.records.trained import TrainedMixture, load
from securegmi.simulation.runner import RunResult

__version__ = "0.1.0"

__all__ = [
    "PROTOCOLS",
    "VAE",
    "BudgetExceededError",
    "CkksParameters",
    "Client",
    "ClientPrivacy",
    "ClientSettings",
    "ConfigError",
    "CryptoError",
    "DataError",
    "Message",
    "MixtureOfVAEs",
    "PrivacyBudget",
    "PrivacyError",
    "ProtocolSpec",
    "ProtocolViolation",
    "PublicContext",
    "RunAbortedError",
    "RunDirectoryError",
    "RunResult",
    "SecretContext",
    "SecureGMIError",
    "Server",
    "SimulationConfig",
    "TrainedMixture",
    "audit",
    "calibrate",
    "load",
    "protocol",
    "simulate",
]
