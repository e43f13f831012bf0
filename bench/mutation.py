"""Mutation report over the privacy and crypto code: does the normal test suite catch a broken
mechanism?

Each curated mutant is one mistake a privacy package can plausibly ship (less noise than the
ledger claims, a skipped ledger entry, a check removed, a secret key on the server). The script
copies the working tree to a scratch directory per mutant, applies the mutant's edits (each
original text must occur exactly once, so a stale mutant is reported, never silently skipped),
and runs the test files that exercise the mutated code, stopping at the first failure. A mutant
is killed when a test fails; it survives when every selected test passes. The unmutated tree is
run first on the union of the selections: a failing baseline would make every mutant look
killed, so the script stops there.

The curated list is used instead of an automatic tool (mutmut 3) because the suite is slow
(minutes per mutant on 2 cores) and most automatic mutants of this code are numerically
equivalent or caught by construction; every mutant here is one a reviewer asked about.

    .venv/bin/python bench/mutation.py                 # all mutants -> bench/results/mutation.json
    .venv/bin/python bench/mutation.py --only count-noise-x0.1 --keep   # one, keep its scratch tree
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "mutation.json"

DP_SGD = "securegmi/privacy/dpsgd.py"
RELEASE = "securegmi/federation/release.py"
STATISTICS = "securegmi/federation/statistics.py"
CALIBRATION = "securegmi/privacy/calibration.py"
ENVELOPE = "securegmi/crypto/envelope.py"
AGGREGATION = "securegmi/crypto/aggregation.py"
AUDIT = "securegmi/records/audit.py"

LEDGER_TESTS = "tests/federation/test_ledger_equals_mechanism.py"
NOISE_TESTS = "tests/federation/test_noise_scale.py"
DP_TESTS = "tests/federation/test_dp.py"
NEIGHBOUR_TESTS = "tests/federation/test_neighbours.py"
SPLIT_TESTS = "tests/federation/test_split_sgd.py"
RECORD_TESTS = "tests/federation/test_record_randomness.py"
COHORT_TESTS = "tests/federation/test_cohort.py"
NOISE_SOURCE_TESTS = "tests/privacy/test_noise.py"
DPSGD_TESTS = "tests/privacy/test_dpsgd.py"
MIXTURE = "securegmi/core/mixture.py"
NOISE = "securegmi/privacy/noise.py"
STATS_TESTS = "tests/federation/test_statistics.py"
CRYPTO_TESTS = "tests/crypto/test_crypto.py"
SECURE_TESTS = "tests/federation/test_secure.py"
PRIVACY_TESTS = "tests/privacy"
AUDIT_TESTS = "tests/cli/test_audit.py"


@dataclass(frozen=True)
class Mutant:
    id: str
    what: str
    edits: tuple[tuple[str, str, str], ...]  # (file, original text, replacement)
    tests: tuple[str, ...]


def _one(mid: str, what: str, file: str, old: str, new: str, *tests: str) -> Mutant:
    return Mutant(mid, what, ((file, old, new),), tests)


MUTANTS: tuple[Mutant, ...] = (
    # --- DP-SGD: the mechanism differs from what the ledger records ---------------------------
    _one(
        "dpsgd-noise-0",
        "DP-SGD adds no noise while the ledger still claims the noise multiplier",
        DP_SGD,
        "noise_multiplier=config.noise_multiplier,",
        "noise_multiplier=0.0,",
        NOISE_TESTS,
        LEDGER_TESTS,
    ),
    _one(
        "dpsgd-noise-x0.5",
        "DP-SGD noise at half the claimed multiplier",
        DP_SGD,
        "noise_multiplier=config.noise_multiplier,",
        "noise_multiplier=0.5 * config.noise_multiplier,",
        NOISE_TESTS,
        LEDGER_TESTS,
    ),
    _one(
        "dpsgd-noise-x2",
        "DP-SGD noise at twice the claimed multiplier (wasted utility, and the ledger is wrong)",
        DP_SGD,
        "noise_multiplier=config.noise_multiplier,",
        "noise_multiplier=2.0 * config.noise_multiplier,",
        NOISE_TESTS,
        LEDGER_TESTS,
    ),
    _one(
        "dpsgd-clip-x2",
        "per-sample gradients clipped at twice the norm the noise is calibrated to",
        DP_SGD,
        "module, max_grad_norm=config.clip_norm, use_ghost_clipping=True",
        "module, max_grad_norm=2 * config.clip_norm, use_ghost_clipping=True",
        DP_TESTS,
        NEIGHBOUR_TESTS,
    ),
    _one(
        "dpsgd-rate-x2",
        "Poisson sampling at twice the rate the ledger records",
        DP_SGD,
        "self.noise.bernoulli(n_records, self.config.sample_rate)",
        "self.noise.bernoulli(n_records, 2 * self.config.sample_rate)",
        LEDGER_TESTS,
    ),
    _one(
        "dpsgd-steps-x3",
        "DP-SGD takes three times the steps the ledger records",
        RELEASE,
        "self.trainer.train(per_sample_loss, len(x), steps, public)",
        "self.trainer.train(per_sample_loss, len(x), 3 * steps, public)",
        LEDGER_TESTS,
    ),
    _one(
        "split-share-noise-0",
        "a split DP-SGD share carries no noise",
        DP_SGD,
        "std = share * self.config.noise_multiplier * self.config.clip_norm",
        "std = 0.0 * share * self.config.noise_multiplier * self.config.clip_norm",
        NOISE_TESTS,
        SPLIT_TESTS,
    ),
    _one(
        "split-share-sized-for-twice-the-cohort",
        "split DP-SGD shares sized so that the minimum cohort carries only 1/sqrt(2) of the noise",
        CALIBRATION,
        "return split_share(self.statistics.min_clients) if self.split_sgd else 1.0",
        "return split_share(2 * self.statistics.min_clients) if self.split_sgd else 1.0",
        NOISE_TESTS,
        SPLIT_TESTS,
    ),
    # --- the three laws of docs/design.md §2: randomness of the record, unguessable noise -----------
    _one(
        "latent-draws-positional",
        "the ELBO's latent draws handed out by batch position from a public seed (main before law 1)",
        MIXTURE,
        "return record_keyed_normals(x, draw_context(), (self.n_components, samples, self.latent))",
        "return torch.from_numpy(np.random.default_rng(draw_context()).standard_normal("
        "(x.shape[0], self.n_components, samples, self.latent), dtype=np.float32))",
        RECORD_TESTS,
    ),
    _one(
        "noise-key-32-bits",
        "the noise generator keyed with 32 bits of entropy (as torch's mt19937 keeps of any seed)",
        NOISE,
        "bits = ChaCha(key=secrets.randbits(KEY_BITS), rounds=ROUNDS)",
        "bits = ChaCha(key=secrets.randbits(KEY_BITS) & 0xFFFFFFFF, rounds=ROUNDS)",
        NOISE_SOURCE_TESTS,
    ),
    _one(
        "dpsgd-noise-from-torch",
        "DP-SGD's noise drawn with torch's global generator instead of the secret ChaCha20 source",
        DP_SGD,
        "noise = self.noise_source.normal(std, reference.shape).to(reference.device)",
        "noise = torch.normal(0.0, std, size=reference.shape)",
        DPSGD_TESTS,
    ),
    _one(
        "server-cohort-1",
        "the public Server sums any number of split shares (cohort 1, as the review's example built it)",
        "securegmi/federation/server.py",
        "s.name: spec.min_shares(spec.downlink_after(s.name).name)",
        "s.name: 1",
        COHORT_TESTS,
    ),
    _one(
        "contributions-unchecked",
        "neither end checks how many releases a private aggregate claims to sum",
        "securegmi/protocol/spec.py",
        "            if summed < required:",
        "            if False:",
        COHORT_TESTS,
    ),
    _one(
        "split-noise-in-the-clear",
        "a client follows a clear protocol with a plan that splits its noise (one share read alone)",
        "securegmi/federation/client.py",
        '    if split and spec.codec != "ckks":',
        "    if False:",
        COHORT_TESTS,
    ),
    _one(
        "split-share-over-root-n",
        "split shares of sigma/sqrt(N): a client that subtracts its own share faces less than sigma",
        CALIBRATION,
        "return 1.0 / math.sqrt(max(min_clients - 1, 1))",
        "return 1.0 / math.sqrt(max(min_clients, 1))",
        STATS_TESTS,
        SPLIT_TESTS,
    ),
    _one(
        "component-randomness-unchecked",
        "a DP client accepts components that draw from torch's generator by batch position",
        RELEASE,
        "        check_record_randomness(learner.model, torch.as_tensor(learner.x[:2]))\n",
        "",
        RECORD_TESTS,
    ),
    # --- the count release (em design) -------------------------------------------------------
    _one(
        "count-noise-x0.1",
        "the count release adds a tenth of its noise",
        RELEASE,
        "self.exact_counts(elbo, temperature), self.plan.count_noise_multiplier, 1.0, self.noise_rng",
        "self.exact_counts(elbo, temperature), 0.1 * self.plan.count_noise_multiplier, 1.0, self.noise_rng",
        NOISE_TESTS,
        DP_TESTS,
    ),
    _one(
        "count-sensitivity-2-claimed-1",
        "each record counted twice (L2 sensitivity 2) while the noise is calibrated to 1",
        RELEASE,
        "return responsibilities(elbo, log_prior(self.learner.pi), temperature).double().sum(0)",
        "return 2 * responsibilities(elbo, log_prior(self.learner.pi), temperature).double().sum(0)",
        DP_TESTS,
        NEIGHBOUR_TESTS,
    ),
    _one(
        "private-pi-after-round-0",
        "after each round the client keeps a private fixed-point pi (never released) as its prior",
        RELEASE,
        "        return Reply(Stage.UPDATE, learner.upload(noisy), events)",
        "        upload = learner.upload(noisy)\n"
        "        from securegmi.core.em import infer_mixture\n"
        "        learner.pi = infer_mixture(elbo, learner.pi, temperature, 5, s.pi_floor)[2]\n"
        "        return Reply(Stage.UPDATE, upload, events)",
        NEIGHBOUR_TESTS,
        DP_TESTS,
    ),
    _one(
        "em-release-skips-ledger",
        "the em design releases without committing its ledger entries",
        RELEASE,
        "self.commit(self.plan.round_entries(round_index))",
        "pass",
        DP_TESTS,
    ),
    _one(
        "statistics-release-skips-ledger",
        "the statistics design releases without committing its ledger entries",
        RELEASE,
        "self.commit(self.plan.round_entries(t))",
        "pass",
        LEDGER_TESTS,
    ),
    # --- the statistics releases ---------------------------------------------------------------
    _one(
        "statistics-noise-x0.1",
        "every statistics release adds a tenth of its noise",
        STATISTICS,
        "sigma = plan.noise_multiplier(release) * plan.share_scale(release)",
        "sigma = 0.1 * plan.noise_multiplier(release) * plan.share_scale(release)",
        NOISE_TESTS,
        PRIVACY_TESTS,
    ),
    _one(
        "moments-sensitivity-sqrt3-claimed-1",
        "the moments release calibrated to sensitivity 1 (its true L2 sensitivity is sqrt(3))",
        "securegmi/core/fine_clusters.py",
        "MOMENTS_SENSITIVITY = math.sqrt(3.0)",
        "MOMENTS_SENSITIVITY = 1.0",
        STATS_TESTS,
        PRIVACY_TESTS,
    ),
    _one(
        "gaussian-ignores-sensitivity",
        "the Gaussian mechanism scales its noise by the multiplier only, not by the sensitivity",
        "securegmi/privacy/mechanisms.py",
        "rng.normal(0.0, noise_multiplier * sensitivity, size=np.shape(value))",
        "rng.normal(0.0, noise_multiplier, size=np.shape(value))",
        NOISE_TESTS,
        PRIVACY_TESTS,
    ),
    _one(
        "noise-from-a-public-seed",
        "clients seed their DP noise from a constant anyone can regenerate",
        "securegmi/privacy/noise.py",
        "bits = ChaCha(key=secrets.randbits(KEY_BITS), rounds=ROUNDS)",
        "bits = ChaCha(key=0, rounds=ROUNDS)",
        DP_TESTS,
    ),
    # --- the ledger and its accounting ---------------------------------------------------------
    _one(
        "ledger-never-refuses",
        "the ledger commits a release that exceeds the budget",
        "securegmi/privacy/ledger.py",
        "if projected.spent > self.budget.epsilon * (1 + _RELATIVE_SLACK):",
        "if False:",
        PRIVACY_TESTS,
        DP_TESTS,
    ),
    _one(
        "ledger-chain-unchecked",
        "a ledger file edited after it was written loads without complaint",
        "securegmi/privacy/ledger.py",
        'if record.get("chain") != link:',
        "if False:",
        PRIVACY_TESTS,
    ),
    _one(
        "audit-trusts-the-ledger",
        "the audit takes each ledger's events as they are, without the plan",
        "securegmi/records/audit.py",
        "problems += _plan_problems(plan, run_config, ledgers)",
        "pass",
        "tests/cli/test_audit.py",
    ),
    _one(
        "audit-ignores-the-transcript",
        "the audit does not compare the events the server received with the ledgers",
        "securegmi/records/audit.py",
        "if mine is None or mine == entry:",
        "if True:",
        "tests/cli/test_audit.py",
    ),
    # --- the audit counts (issue 25): each partial edit of a run directory it must catch ----
    _one(
        "audit-ledger-tail-cut-unchecked",
        "the audit does not compare each ledger's entries with the plan's completed rounds",
        AUDIT,
        "if absent and not excused:",
        "if False:",
        AUDIT_TESTS + "::test_a_ledger_cut_at_its_tail_with_its_transcript_rows_fails_the_audit",
    ),
    _one(
        "audit-missing-client-unchecked",
        "the audit does not compare the number of clients with the configuration",
        AUDIT,
        "if count != config.clients",
        "if False",
        AUDIT_TESTS + "::test_a_client_deleted_with_its_transcript_rows_fails_the_audit",
    ),
    _one(
        "audit-double-release-unflagged",
        "the audit does not flag a release the server received twice with different contents",
        AUDIT,
        "if len(contents) > 1 and client not in reported:",
        "if False:",
        AUDIT_TESTS + "::test_a_release_received_twice_with_different_contents_fails_the_audit",
    ),
    _one(
        "audit-seeded-relabel-unchecked",
        "the audit takes the configuration's word for the noise source, not the ledgers'",
        AUDIT,
        "if source != PRIVATE_NOISE:",
        "if False:",
        SECURE_TESTS + "::test_a_seeded_run_relabelled_private_still_fails_the_audit",
    ),
    _one(
        "ledger-noise-source-outside-the-chain",
        "a ledger's noise source is not hashed into its first link (relabelling it goes unseen)",
        "securegmi/privacy/ledger.py",
        'head["noise"] = noise',
        "pass",
        "tests/privacy/test_ledger.py",
    ),
    _one(
        "audit-split-cohort-uncounted",
        "the audit does not count the uploads a split-noise round's sum added",
        AUDIT,
        "if split and summed < minimum:",
        "if False:",
        SECURE_TESTS + "::test_a_split_round_summed_from_fewer_than_the_minimum_cohort_fails_the_audit",
    ),
    # --- the audit cross-checks the transcript with the run's other records ------------------
    _one(
        "audit-server-state-contributions-unchecked",
        "the audit does not compare the replies the transcript records added with the server's saved count",
        AUDIT,
        "if len(added) == state.contributions:",
        "if True:",
        AUDIT_TESTS + "::test_a_ledger_tail_cut_behind_a_forged_refusal_fails_the_audit",
        AUDIT_TESTS + "::test_each_record_of_the_round_alone_catches_a_forged_refusal",
    ),
    _one(
        "audit-metrics-refusals-unchecked",
        "the audit does not compare each round's refusals in the transcript with metrics.jsonl's count",
        AUDIT,
        "if counted != len(attempt.refused):",
        "if False:",
        AUDIT_TESTS + "::test_a_ledger_tail_cut_behind_a_forged_refusal_fails_the_audit",
        AUDIT_TESTS + "::test_each_record_of_the_round_alone_catches_a_forged_refusal",
    ),
    _one(
        "audit-engine-refusals-unchecked",
        "the audit does not compare each round's refusals in the transcript with engine.json's (Flower)",
        AUDIT,
        "if refused != recorded:",
        "if False:",
        AUDIT_TESTS + "::test_each_record_of_the_round_alone_catches_a_forged_refusal",
    ),
    _one(
        "audit-client-state-ledger-unchecked",
        "the audit does not compare each ledger file with the ledger copy and outbox of its client's state",
        AUDIT,
        "if lacks or differs:",
        "if False:",
        AUDIT_TESTS + "::test_a_ledger_tail_cut_behind_a_forged_refusal_fails_the_audit",
        AUDIT_TESTS + "::test_each_record_of_the_round_alone_catches_a_forged_refusal",
        AUDIT_TESTS + "::test_a_client_state_whose_outbox_the_ledger_does_not_cover_fails_the_audit",
    ),
    _one(
        "audit-client-state-outbox-unchecked",
        "the audit does not check that a ledger covers the round its client's state says it answered",
        AUDIT,
        "if plan is not None and answered is not None and 0 <= answered < plan.rounds:",
        "if False:",
        AUDIT_TESTS + "::test_a_client_state_whose_outbox_the_ledger_does_not_cover_fails_the_audit",
    ),
    _one(
        "audit-protocol-min-shares-unchecked",
        "the audit does not compare protocol.json's N (fewest shares a sum may add) with the plan's cohort",
        AUDIT,
        'if isinstance(plan, PrivateMixturePlan) and dims.get("N") != plan.statistics.min_clients:',
        "if False:",
        AUDIT_TESTS + "::test_a_protocol_bound_to_fewer_shares_than_the_plans_cohort_fails_the_audit",
    ),
    _one(
        "audit-results-client-count-unchecked",
        "the audit does not compare results.json's and the model's count of clients with config.json's",
        AUDIT,
        "if n != config.clients",
        "if False",
        AUDIT_TESTS + "::test_a_client_erased_from_an_em_run_fails_the_audit",
    ),
    _one(
        "audit-protocol-name-unchecked",
        "the audit does not compare config.json's protocol with the one protocol.json names",
        AUDIT,
        "if config.protocol != spec.name:",
        "if False:",
        AUDIT_TESTS + "::test_a_configuration_of_another_protocol_fails_the_audit",
    ),
    _one(
        "audit-split-in-the-clear-unflagged",
        "the audit does not flag split noise under a protocol whose releases travel in the clear",
        AUDIT,
        'if split and spec.codec != "ckks":',
        "if False:",
        SECURE_TESTS + "::test_split_noise_sent_in_the_clear_fails_the_audit",
    ),
    _one(
        "audit-seeded-noise-state-unchecked",
        "the audit does not flag a client state holding (seeded) noise state in a run claiming private noise",
        AUDIT,
        'if "noise" in metadata and PRIVATE_NOISE in claimed:',
        "if False:",
        SECURE_TESTS + "::test_a_seeded_run_relabelled_private_with_its_ledgers_rewritten_fails_the_audit",
    ),
    _one(
        "audit-results-noise-unchecked",
        "the audit does not compare results.json's noise source with config.json's",
        AUDIT,
        "if isinstance(privacy, dict) and any(",
        "if False and any(",
        SECURE_TESTS + "::test_a_seeded_run_relabelled_private_with_its_ledgers_rewritten_fails_the_audit",
    ),
    _one(
        "release-without-its-event",
        "a client's message need not carry the parameters of the events its fields name",
        "securegmi/protocol/spec.py",
        'if sender_role == "client" and named != set(message.events):',
        "if False:",
        "tests/protocol/test_spec.py",
    ),
    _one(
        "one-run-audit-binomial-at-half",
        "the one-run audit's null hypothesis ignores epsilon (randomised response at 1/2)",
        "securegmi/privacy/auditing.py",
        "q = 1.0 / (1.0 + math.exp(-epsilon))",
        "q = 0.5",
        "tests/privacy/test_one_run_audit.py",
    ),
    _one(
        "accounting-ignores-step-count",
        "a self-composed event (T DP-SGD steps) is accounted as one step",
        "securegmi/privacy/accounting.py",
        "repeated: np.ndarray = int(event.count) * _rdp_curve(event.event)",
        "repeated: np.ndarray = 1 * _rdp_curve(event.event)",
        PRIVACY_TESTS,
    ),
    _one(
        "accounting-last-event-only",
        "epsilon composes the last event only",
        "securegmi/privacy/accounting.py",
        "total = sum((_rdp_curve(event) for event in events), np.zeros(len(RDP_ORDERS)))",
        "total = sum((_rdp_curve(event) for event in list(events)[-1:]), np.zeros(len(RDP_ORDERS)))",
        PRIVACY_TESTS,
    ),
    _one(
        "pld-ignores-step-count",
        "the primary (PLD) figure accounts T subsampled DP-SGD steps as one",
        "securegmi/privacy/accounting.py",
        "self._subsampled[(q, sigma)] += count",
        "self._subsampled[(q, sigma)] += 1",
        PRIVACY_TESTS,
    ),
    _one(
        "pld-ignores-gaussian-count",
        "the primary (PLD) figure accounts repeated Gaussian releases as one",
        "securegmi/privacy/accounting.py",
        "self._inverse_variance += count / sigma**2",
        "self._inverse_variance += 1 / sigma**2",
        PRIVACY_TESTS,
    ),
    # --- CKKS: the release grid and the server's key ---------------------------------------
    _one(
        "release-grid-0",
        "decrypted values leave a client unrounded (the release grid is gone)",
        "securegmi/crypto/release.py",
        "rounded: np.ndarray = np.round(np.asarray(values, dtype=np.float64) / precision) * precision",
        "rounded: np.ndarray = np.asarray(values, dtype=np.float64)",
        CRYPTO_TESTS,
        SECURE_TESTS,
    ),
    _one(
        "release-grid-below-ckks-error",
        "the release grid is finer than the CKKS error, so rounding keeps the key-dependent noise",
        "securegmi/crypto/params.py",
        "math.log10(100 * self.precision())",
        "math.log10(1e-4 * self.precision())",
        CRYPTO_TESTS,
        SECURE_TESTS,
    ),
    _one(
        "codec-skips-release",
        "a CKKS client uses exact decryptions, bypassing the release function",
        "securegmi/federation/codec.py",
        "clear = release_decrypted(decrypt(self.keys, f.data), self.keys.params.release_grid())",
        "clear = decrypt(self.keys, f.data)",
        SECURE_TESTS,
        "tests/federation/test_release_path.py",
    ),
    Mutant(
        "server-context-keeps-secret-key",
        "the key ceremony hands the server a context that holds the secret key",
        (
            ("securegmi/crypto/keys.py", "if context.has_secret_key() or context.is_private():", "if False:"),
            (
                "securegmi/crypto/keys.py",
                "return PublicContext(self.public_bytes, self.params)",
                "return PublicContext(self.context.serialize(save_secret_key=True), self.params)",
            ),
        ),
        (
            SECURE_TESTS
            + "::test_no_secret_is_reachable_from_the_server_and_the_walk_finds_each_hiding_place",
            CRYPTO_TESTS,
        ),
    ),
    # --- CKKS envelope and update checks: each removed ---------------------------------------
    _one(
        "envelope-chunk-count-unchecked",
        "an envelope may hold another number of chunks than its header declares",
        ENVELOPE,
        "if len(chunks) != header.chunks:",
        "if False:",
        CRYPTO_TESTS,
    ),
    _one(
        "decrypt-key-id-unchecked",
        "a client decrypts an aggregate under another key (garbage) without complaint",
        ENVELOPE,
        'if header.key_id != ctx.key_id:\n        raise CryptoError("this aggregate',
        'if False:\n        raise CryptoError("this aggregate',
        CRYPTO_TESTS,
    ),
    _one(
        "update-key-id-unchecked",
        "the server adds an update under another key",
        AGGREGATION,
        "if header.key_id != ctx.key_id:",
        "if False:",
        CRYPTO_TESTS,
    ),
    _one(
        "update-header-unchecked",
        "the server adds an update whose header (length, parameters, chunks) is not the expected one",
        AGGREGATION,
        "if header != expected:",
        "if False:",
        CRYPTO_TESTS,
    ),
    _one(
        "update-size-limit-unchecked",
        "the server parses an update of any size",
        AGGREGATION,
        "if len(data) > max_bytes:",
        "if False:",
        CRYPTO_TESTS,
    ),
    _one(
        "ciphertext-level-unchecked",
        "the server adds a chunk at another level than a fresh ciphertext's",
        AGGREGATION,
        "if ct.coeff_modulus_size() != p.data_primes:",
        "if False:",
        CRYPTO_TESTS,
    ),
    _one(
        "ciphertext-scale-unchecked",
        "the server adds a chunk at another scale",
        AGGREGATION,
        "if ct.scale != p.scale:",
        "if False:",
        CRYPTO_TESTS,
    ),
    _one(
        "ciphertext-size-unchecked",
        "the server adds a chunk of three polynomials (an unrelinearised product)",
        AGGREGATION,
        "if ct.size() != 2:",
        "if False:",
        CRYPTO_TESTS,
    ),
    _one(
        "nan-encrypted",
        "a client encrypts NaN, poisoning the aggregate",
        ENVELOPE,
        "if not np.all(np.isfinite(flat)):",
        "if False:",
        CRYPTO_TESTS,
    ),
    # --- identity: who sent a message ------------------------------------------------------
    _one(
        "sender-unchecked",
        "the protocol accepts a message whose sender is not the client on the link",
        "securegmi/protocol/spec.py",
        "if sender is not None and message.sender != sender:",
        "if False:",
        "tests/protocol",
        "tests/federation/test_transport.py",
    ),
    _one(
        "flower-reply-from-unaddressed-node",
        "the Flower transport uses a reply from a node it did not address this round",
        "securegmi/adapters/flower.py",
        "if cid is None or cid not in outgoing:",
        "if False:",
        "tests/adapters/test_flower_identity.py",
    ),
    _one(
        "flower-second-reply-used",
        "a node that answers one instruction twice has its second reply used",
        "securegmi/adapters/flower.py",
        "if cid in answered:",
        "if False:",
        "tests/adapters/test_flower_identity.py",
    ),
    _one(
        "flower-two-nodes-one-client",
        "two Flower nodes may claim to host the same client",
        "securegmi/adapters/flower.py",
        "if cid in mapping:",
        "if False:",
        "tests/adapters/test_flower_identity.py",
    ),
    _one(
        "server-adds-replies-from-another-run",
        "the server adds a reply carrying another run's id",
        "securegmi/federation/server.py",
        "if message.run != self.run_id:",
        "if False:",
        "tests/federation/test_contract.py",
    ),
    _one(
        "server-trusts-the-claimed-link",
        "the server adds a reply signed by another client than the link it came on",
        "securegmi/federation/server.py",
        "if message.sender != sender:",
        "if False:",
        "tests/federation/test_contract.py",
    ),
    _one(
        "server-aggregates-a-round-twice",
        "a second batch of replies for a round already added replaces its sums",
        "securegmi/federation/server.py",
        "if self.aggregated is not None and self.aggregated == self.round:",
        "if False:",
        "tests/federation/test_contract.py",
    ),
    _one(
        "client-answers-another-run",
        "a client answers a server of another run than the one it joined",
        "securegmi/federation/client.py",
        "elif message.run != self.run_id:",
        "elif False:",
        "tests/federation/test_contract.py",
    ),
    _one(
        "client-redraws-a-resent-round",
        "a client asked again for a round it answered computes (and noises) a fresh reply",
        "securegmi/federation/client.py",
        "if (message.run, message.round, message.stage) == (run, answered, asked):",
        "if False:",
        "tests/federation/test_client.py",
    ),
    _one(
        "crashed-release-charged-twice",
        "a release committed before a crash is charged again when it is recomputed",
        RELEASE,
        "self.ledger = self.ledger.check(tuple(e for e in entries if e not in self.ledger.entries))",
        "self.ledger = self.ledger.check(entries)",
        "tests/federation/test_client.py",
    ),
    _one(
        "fresh-client-forgets-its-ledger-file",
        "a client without its state starts from an empty ledger though its ledger file records spending",
        RELEASE,
        "if privacy.ledger_path is not None and privacy.ledger_path.exists():",
        "if False:",
        "tests/federation/test_client.py",
    ),
    _one(
        "client-crash-ends-the-run",
        "a client that fails mid-round takes the whole round (and run) down instead of dropping out",
        "securegmi/federation/transport.py",
        "            except Exception as exc:\n",
        "            except ZeroDivisionError as exc:\n",
        "tests/federation/test_dropouts.py",
    ),
    _one(
        "server-adds-replies-to-another-round",
        "the server adds a reply to an earlier round (a replay)",
        "securegmi/federation/server.py",
        "if message.round != self.round:",
        "if False:",
        "tests/federation/test_contract.py",
        "tests/federation/test_transport.py",
    ),
)


def scratch_copy(destination: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored), with protocols/ and
    cli/ linked inside the package as an install places them."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.split(b"\0")
    for name in (n.decode() for n in listed if n):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for sub in ("protocols", "cli"):
        (destination / "securegmi" / sub).symlink_to(destination / sub)


def apply(mutant: Mutant, tree: Path) -> None:
    for file, old, new in mutant.edits:
        path = tree / file
        text = path.read_text()
        if text.count(old) != 1:
            raise LookupError(f"{mutant.id}: {old!r} occurs {text.count(old)} times in {file}")
        path.write_text(text.replace(old, new))


TIMEOUT = 900  # seconds per mutant; the slowest selection takes about 150 s


def run_tests(tree: Path, tests: tuple[str, ...], stop_at_first: bool) -> tuple[int, list[str], float]:
    """(pytest exit code, the failing tests, seconds) for `tests` run in `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *tests]
    if stop_at_first:
        command.insert(4, "-x")
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:  # a hang: neither killed nor survived, reported as such
        return -1, ["timeout"], round(time.perf_counter() - started, 1)
    failed = [
        line.split(" ", 1)[1].split(" - ")[0]
        for line in done.stdout.splitlines()
        if line.startswith(("FAILED ", "ERROR "))
    ]
    return done.returncode, failed, round(time.perf_counter() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch trees")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    if args.list or not mutants:
        for m in MUTANTS:
            print(f"{m.id:42s} {m.what}")
        return
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="securegmi-mutation-"))
    try:
        baseline_tree = scratch / "baseline"
        scratch_copy(baseline_tree)
        selection = tuple(sorted({t for m in mutants for t in m.tests}))
        code, failed, baseline_seconds = run_tests(baseline_tree, selection, stop_at_first=False)
        print(f"baseline: exit {code} in {baseline_seconds} s over {len(selection)} test paths")
        if code != 0:
            raise SystemExit(f"the unmutated tree fails {failed}: fix that first")
        rows = []
        for mutant in mutants:
            tree = scratch / mutant.id
            shutil.copytree(baseline_tree, tree, symlinks=True)  # the tree as it was at the start
            apply(mutant, tree)
            code, failed, seconds = run_tests(tree, mutant.tests, stop_at_first=True)
            # 1: a test failed; 2: collection failed (the mutant broke an import). Anything else
            # (no tests found, a usage error) says nothing about the mutant.
            status = {0: "survived", 1: "killed", 2: "killed", -1: "timeout"}.get(code, "error")
            rows.append(
                {
                    "id": mutant.id,
                    "what": mutant.what,
                    "files": sorted({f for f, _, _ in mutant.edits}),
                    "tests": list(mutant.tests),
                    "status": status,
                    "killed_by": failed,
                    "pytest_exit": code,
                    "seconds": seconds,
                }
            )
            print(f"{status:8s} {seconds:7.1f} s  {mutant.id:42s} {failed[:1]}", flush=True)
            if not args.keep:
                shutil.rmtree(tree)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    killed = sum(r["status"] == "killed" for r in rows)
    report = {
        "command": "python bench/mutation.py" + (" --only " + " ".join(args.only) if args.only else ""),
        "baseline": {"tests": list(selection), "seconds": baseline_seconds},
        "tried": len(rows),
        "killed": killed,
        "survived": len(rows) - killed,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "mutants": rows,
    }
    if not args.only:
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    print(f"{killed} of {len(rows)} mutants killed in {report['wall_seconds']} s")


if __name__ == "__main__":
    main()
