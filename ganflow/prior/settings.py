"""Stage one's settings: the ``[train]`` table (`TrainSettings`), what may change on resume, and the schedules
derived from the settings (the learning-rate annealing and the read-out clip).

Example:
    >>> s = TrainSettings(steps=100, anneal_steps=50, anneal_final=0.1)
    >>> anneal_factor(s, 50), round(anneal_factor(s, 100), 6)
    (1.0, 0.1)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import Config
from ..errors import GanflowError

__all__ = ["TrainSettings", "load_train_settings", "anneal_factor", "in_annealing", "clamp_level", "settings_mismatch",
           "RESUME_OVERRIDES"]


@dataclass(frozen=True)
class TrainSettings:
    """WGAN-GP training settings (the ``[train]`` config table).

    Args:
        latent_dim: latent dimension ``k``.
        steps: generator steps (each preceded by ``n_critic`` critic steps).
        batch_size: fields per batch.
        n_critic: critic steps per generator step.
        gp_weight: gradient-penalty weight ``lambda``.
        lr_g, lr_d: Adam learning rates of the generator and the critic.
        betas: Adam ``(beta1, beta2)`` for both.
        ema_decay: EMA decay of the generator weights (the prior uses the EMA weights).
        val_fraction: held-out fraction of the fields (for the report; never trained on).
        checkpoint_every_s: save a checkpoint after this many seconds of training (and at the end).
        base_channels: channels of the finest conv layer (2-D fields).
        mlp_hidden, mlp_depth: width and number of hidden layers of the MLP pair (1-D fields).
        output: the generator's read-out: ``"linear"`` (unbounded) or ``"tanh"`` (bounded to the training
            fields' range ``[min, max]``; the fields are then normalised by the range, ``mu = (max + min) / 2``,
            ``s = (max - min) / 2``). Bounded or binary fields (channels, phantoms) want ``"tanh"``: a linear
            read-out spreads its values over the gap between the levels.
        tanh_margin: with ``output = "tanh"``, widen the range by this fraction (``s = (1 + margin)
            (max - min) / 2``), so the data's extreme levels are reached at finite pre-activations. A field that
            sits mostly at one extreme (the phantoms' zero background) needs it: pinned at -1, the read-out
            saturated and the generator collapsed to the background.
        clamp: ``"off"``, ``"on"`` or ``"anneal"``: with ``output = "tanh"`` and ``tanh_margin > 0``, clip the
            widened read-out back to the training fields' range (`ganflow.prior.nets.set_clamp`), from the start
            or from the first step of the annealing phase. A level that many pixels sit at exactly (the phantoms'
            zero background) becomes an atom the generator reaches at finite pre-activations, where a tanh alone
            leaves faint noise about it (docs/prior.md). Pixels beyond the clip get no gradient, so a generator
            that starts clipped can stay pinned at a level: ``"anneal"`` switches it on once the generator has
            formed. May be changed on resume (the clip has no parameters).
        log_every: record the Wasserstein estimate every this many generator steps.
        representation_fields: held-out fields (at most) projected onto the range of the trained generator to
            estimate its representation error (`ganflow.prior.residuals`, stored in the checkpoint); 0 skips it.
        anneal_steps: the last ``anneal_steps`` generator steps decay both learning rates linearly to
            ``anneal_final`` times their value (0: constant rates). A GAN's generator keeps oscillating about the
            equilibrium at a constant rate, and the EMA of an oscillating generator varies less than the data
            (docs/prior.md: the phantoms' brightness); annealing lets it settle. May be added on resume.
        anneal_final: the learning-rate factor at the last step, in ``(0, 1]``.
        anneal_shape: ``"linear"`` or ``"geometric"`` (the factor falls by the same ratio every step: to
            ``anneal_final = 0.01`` a decade in each half of the phase, so half the phase runs below 0.1x, where
            the phantom generator settled; docs/prior.md).
        max_failures: non-finite generator steps tolerated; each is undone (networks, EMA and optimisers go
            back to the last good step) and halves both learning rates; one more stops the run with the last
            good state saved.
    """

    latent_dim: int = 64
    steps: int = 2000
    batch_size: int = 64
    # Two-timescale updates (Heusel et al. 2017): two critic steps at three times the generator's rate gave 2.6x
    # the generator steps per second of five at equal rates and better fields per second (docs/prior.md, "What
    # changed the elliptic prior"); both bundled priors were trained this way.
    n_critic: int = 2
    gp_weight: float = 10.0
    lr_g: float = 1e-4
    lr_d: float = 3e-4
    betas: tuple[float, float] = (0.0, 0.9)
    ema_decay: float = 0.999
    val_fraction: float = 0.1
    checkpoint_every_s: float = 300.0
    base_channels: int = 16
    mlp_hidden: int = 256
    mlp_depth: int = 3
    output: str = "linear"
    tanh_margin: float = 0.0
    # the critic also sees the batch's spread (ProGAN's minibatch sd feature; conv priors): against a generator
    # whose draws vary less than the data (docs/prior.md)
    critic_mbstd: bool = False
    clamp: str = "off"
    log_every: int = 10
    representation_fields: int = 200
    anneal_steps: int = 0
    anneal_final: float = 0.1
    anneal_shape: str = "linear"
    max_failures: int = 20

    def validate(self) -> None:
        """Raise `GanflowError` naming the first bad setting."""
        checks = [
            ("latent_dim", self.latent_dim >= 1, ">= 1"),
            ("steps", self.steps >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("n_critic", self.n_critic >= 1, ">= 1"),
            ("gp_weight", self.gp_weight >= 0, ">= 0"),
            ("lr_g", self.lr_g > 0, "> 0"),
            ("lr_d", self.lr_d > 0, "> 0"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
            ("val_fraction", 0 <= self.val_fraction < 1, "in [0, 1)"),
            ("checkpoint_every_s", self.checkpoint_every_s > 0, "> 0"),
            ("base_channels", self.base_channels >= 1, ">= 1"),
            ("mlp_hidden", self.mlp_hidden >= 1, ">= 1"),
            ("mlp_depth", self.mlp_depth >= 1, ">= 1"),
            ("output", self.output in ("linear", "tanh"), "'linear' or 'tanh'"),
            ("tanh_margin", 0 <= self.tanh_margin <= 1, "in [0, 1]"),
            ("clamp", self.clamp in ("off", "on", "anneal"), "'off', 'on' or 'anneal'"),
            ("clamp", self.clamp == "off" or (self.output == "tanh" and self.tanh_margin > 0),
             "'off' unless output = 'tanh' with tanh_margin > 0 (else the read-out never leaves the range)"),
            ("clamp", self.clamp != "anneal" or self.anneal_steps > 0, "'on' or 'off' without anneal_steps"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("representation_fields", self.representation_fields >= 0, ">= 0"),
            ("max_failures", self.max_failures >= 0, ">= 0"),
            ("anneal_steps", self.anneal_steps >= 0, ">= 0"),
            ("anneal_final", 0 < self.anneal_final <= 1, "in (0, 1]"),
            ("anneal_shape", self.anneal_shape in ("linear", "geometric"), "'linear' or 'geometric'"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise GanflowError(f"train.{name} must be {want}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        from ..config import parse_settings

        return parse_settings(cls, d, "train")


def load_train_settings(config_path: str | None, steps: int | None = None) -> TrainSettings:
    """`TrainSettings` from a config's ``[train]`` table (unknown keys are errors), ``steps`` overriding."""
    # One config file serves every command of a problem, so tables of other commands are allowed.
    s = Config.from_file(config_path).section(TrainSettings, "train")
    if steps is not None:
        s = dataclasses.replace(s, steps=int(steps))
        s.validate()
    return s


# on resume these come from the given settings, every other one from the checkpoint
RESUME_OVERRIDES = ("steps", "anneal_steps", "anneal_final", "anneal_shape", "clamp")


def settings_mismatch(a: dict, b: dict) -> list[str]:
    # steps, checkpoint_every_s, max_failures, representation_fields and the annealing may change on resume
    # (older checkpoints lack some); everything else shapes the computation. The annealing phase is defined from
    # the last step, which may move on resume, so it may too: a run trained at constant rates can be continued
    # with an annealing phase. The read-out clamp has no parameters, so it may be switched too. A key an older
    # checkpoint lacks had its default then (output: linear).
    free = {"steps", "checkpoint_every_s", "max_failures", "representation_fields", "anneal_steps", "anneal_final",
            "anneal_shape", "clamp"}
    defaults = TrainSettings().to_dict()
    a, b = {**defaults, **a}, {**defaults, **b}
    return sorted(k for k in set(a) | set(b) if k not in free and a.get(k) != b.get(k))


def anneal_factor(settings: TrainSettings, step: int) -> float:
    """The learning-rate factor at generator step ``step`` (1-based): 1, then linearly or geometrically (by
    ``anneal_shape``) to ``anneal_final`` over the last ``anneal_steps`` steps."""
    if not in_annealing(settings, step):
        return 1.0
    t = (step - settings.steps + settings.anneal_steps) / settings.anneal_steps
    if settings.anneal_shape == "geometric":
        return settings.anneal_final**t
    return 1.0 - (1.0 - settings.anneal_final) * t


def in_annealing(settings: TrainSettings, step: int) -> bool:
    """Whether generator step ``step`` (1-based) is in the annealing phase (the last ``anneal_steps``)."""
    return step > settings.steps - settings.anneal_steps


def clamp_level(settings: TrainSettings) -> float:
    """The read-out clip in normalised units: the training range inside the tanh's widened one."""
    return 1.0 / (1.0 + settings.tanh_margin)
