"""The contract between the engine and the parts that plugins register.

Each kind is built from a recipe mapping ``{name: ..., **kwargs}``. Besides the recipe's kwargs the
engine passes *context* arguments, but only those the factory's signature names:

==============  ===========================================================================
kind            context arguments the engine may pass
==============  ===========================================================================
generator       ``in_channels`` (1), ``out_channels`` (1)
head            ``in_channels`` (channels of the feature it reads), ``num_classes`` (DRFs)
guidance        ``channels`` ({part: film_channels} of the generator and a guidable refiner),
                ``drfs``, ``num_classes``
refiner         ``in_channels`` (1)
discriminator   ``in_channels`` (image channels, 1)
loss            none
source          ``drfs`` (the recipe's DRF list)
scheme          ``model``, ``discriminator``, ``losses``, ``optimizer``, ``wrap``, ``precision``,
                ``device``, ``registry`` (see :class:`lowdose_toolkit.schemes.Scheme`)
logger          ``run_dir`` (the run directory), ``recipe`` (the resolved recipe)
==============  ===========================================================================

Context names may not be set in a recipe. Engine-level keys that are read by the engine and not
passed to a factory: heads ``input`` (feature name: ``image``, the low-dose input, or one of the
generator's features) and ``target`` (batch key, default ``drf_class``); guidance ``head`` (the head
whose prediction drives it); losses ``weight`` and ``on`` (``coarse``, ``refined``, ``pred`` or a
head name).

Module contracts (all tensors are ``[B, C, D, H, W]``):

* generator: ``forward(x) -> y`` and ``forward_features(x) -> (y, {feature_name: tensor})``;
  attribute ``feature_channels: dict[str, int]`` naming what heads may read (at least
  ``bottleneck`` for encoder-decoder networks). Any spatial size must work.
* head: ``forward(feature) -> prediction`` (e.g. logits ``[B, num_classes]``). A head that drives
  guidance (``model.guidance.head``) must return DRF class logits ``[B, num_classes]`` in the order
  of ``data.drfs`` and have ``target: drf_class``; that is the whole contract, so a third-party head
  drives the built-in guidance as it is.
  A dose head may also be *calibrated* on whole volumes: ``statistics(image) -> [B, F]`` (fixed: no
  trained weights, so the engine computes them once) and ``calibrate(statistics, classes) -> accuracy``;
  the engine calls it before each validation with whole training volumes, and the head uses the
  calibrated classifier in eval mode (``noise_level`` does). A dose head may also classify a *whole
  volume* of any size, ``volume_logits(volume [1, 1, X, Y, Z]) -> [1, num_classes]`` (in bounded
  memory); inference then calls it once per volume and conditions every sliding window of a guided
  model on it (``Predictor.dose_estimate``; ``noise_level`` does), instead of the head on each window.
  It may give a continuous dose level with them, ``volume_estimate(volume) -> (logits [1, K], level)``
  (``level``: the DRF the volume's noise corresponds to, a positive float, below the smallest class for a
  cleaner scan; None when unknown); a guided model is then conditioned on it (between the codes of the
  two DRF classes around it) and its fitted strength (``eval.fit_strength``,
  :mod:`lowdose_toolkit.models.strength`) follows it. A head that wants the DRFs takes ``drfs``.
* guidance: ``code(logits, drf_class=None) -> probs [B, num_classes]`` (the head's softmax; the true
  class where given: always in eval mode, for a fraction of samples in training) and
  ``forward(probs) -> {part: Conditioning}`` (:mod:`lowdose_toolkit.guidance`: per guided part,
  ``generator`` and ``refiner``, one ``(gamma, beta)`` per entry of its ``film_channels`` and an
  optional residual ``gate``). The engine runs the head on the features the generator hands it after
  its encoder and passes the generator's conditioning back, then the refiner's to the refiner. A
  guidance may expose ``stage_parts: {part: module}`` so that ``train.stages`` trains each piece with
  the part it conditions; without it the whole guidance trains and freezes with the generator.
  Optional, for a map from each class to the code that serves it best on validation (``film``'s
  ``fit_codes``): attributes ``fit_codes: bool`` and ``codes_fitted`` (a bool buffer), and methods
  ``reset_code_map()`` and ``set_code_map(gains [class, code]) -> list[int]``; after training the engine
  measures the validation volumes under every code and calls it once, in best.pt (``code_fit.json``).
* guidable generator (needed only with ``model.guidance``): attribute ``film_channels: list[int]``
  and ``forward_features(x, guide=None)``, which calls ``guide(features)`` once its encoder features
  exist, and applies the returned ``Conditioning`` with ``modulate(i, h)`` at modulation point ``i``
  and ``apply_gate(r)`` to a residual. A guidable refiner declares ``film_channels`` and takes
  ``forward(coarse, cond=None)``; an unguidable one is left as it is.
* refiner: ``forward(coarse) -> refined`` of the same shape.
* discriminator: ``forward(image, condition=None) -> patch logits``; attribute ``conditional``.
* loss: ``forward(pred, target) -> scalar`` (``forward(pred, target, low=...)`` if it has
  ``uses_input = True``: it is given the low-dose input, e.g. to balance DRFs); an adversarial loss
  has ``adversarial = True`` and ``forward(logits, real: bool) -> scalar``. A loss may expose
  ``record: dict`` (e.g. which weights the perceptual network used); the engine writes it into the
  run record.
* source: ``records() -> list[SubjectRecord]`` (see ``lowdose_toolkit.records``).
* logger (``train.loggers``, rank 0 only; :class:`lowdose_toolkit.loggers.Logger`): ``start(epoch,
  history)`` before the first epoch this process trains (the last committed epoch, 0 for a new run, and
  the committed epoch records), ``log_epoch(record, pictures)`` after each epoch's checkpoint is written
  (its ``metrics.jsonl`` record and ``{name: PNG path}``: ``preview``, ``curves``), ``close()`` when
  training ends however it ends. Building one must not touch the disk or the network (``ldt check``
  builds it): ``start`` does.

Conformance (:mod:`lowdose_toolkit.testing`): a factory may declare ``example_args`` (small keyword
arguments for fast checks), a head that reads the image ``reads_image = True``, and a loss on class
logits ``classifies = True``; ``check_part(kind, name)`` and ``train_steps(kind, name)`` then check the
contract above and train a tiny recipe around the part.

Any part may set a learning-rate factor on its parameters (``schemes.set_lr_scale(self, 10)``): the
scheme's optimizer then puts them in a group with that factor on ``train.optimizer.lr`` (small heads
beside a large generator).
"""

CONTEXT_ARGS: dict[str, tuple[str, ...]] = {
    "generator": ("in_channels", "out_channels"),
    "head": ("in_channels", "num_classes", "drfs"),
    "guidance": ("channels", "drfs", "num_classes"),
    "refiner": ("in_channels",),
    "discriminator": ("in_channels",),
    "loss": (),
    "source": ("drfs",),
    "scheme": ("model", "discriminator", "losses", "optimizer", "wrap", "precision", "device", "registry"),
    "logger": ("run_dir", "recipe"),
}
KINDS: tuple[str, ...] = tuple(CONTEXT_ARGS)
