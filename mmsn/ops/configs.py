"""The options of an SN or SW op call besides its tensors, as one frozen, checked object.

A layer builds its config once (``mmsn/layers``) and hands it by name to the op, which
passes it down to the reference or to the launches. What changes between calls of one
layer stays out of it and travels beside it: ``use_batch_stats`` (``train()`` and
``eval()``) and ``sync``, the process group (initialised after the model is built).

The checks raise ``ValueError`` naming the argument, so a bad option fails where the layer
is built, not in a kernel.
"""
import dataclasses
from typing import Optional

#: Order of the SW statistics in the ratio vectors, per sw_type.
SW_STATISTICS = {2: ('bw', 'iw'), 3: ('bw', 'iw', 'ln'), 5: ('bw', 'iw', 'bn', 'in', 'ln')}
#: How SW computes the inverse square root: Newton's iteration (the paper's) or exactly.
SW_METHODS = ('newton', 'eigh')


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f'{name}: expected a positive int, got {value!r}')
    return value


def check_momentum(momentum: Optional[float]) -> Optional[float]:
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(
            momentum, (int, float)) or not 0.0 <= momentum <= 1.0):
        raise ValueError(f'momentum: expected a float in [0, 1] or None (cumulative average), '
                         f'got {momentum!r}')
    return None if momentum is None else float(momentum)


def check_eps(eps: float) -> float:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise ValueError(f'eps: expected a positive float, got {eps!r}')
    return float(eps)


def _check_shared_options(config) -> None:
    """Checks the options both configs have and stores the checked values (frozen: through
    ``object.__setattr__``, as dataclasses' own ``__init__`` does)."""
    for name, check in (('momentum', check_momentum), ('eps', check_eps), ('logits', bool)):
        object.__setattr__(config, name, check(getattr(config, name)))


@dataclasses.dataclass(frozen=True)
class SNConfig:
    """An SN layer's options as its op reads them.

    Attributes:
        momentum (float, optional): running-statistics momentum in PyTorch's convention;
            None for a cumulative average.
        eps (float): added to the mixed variance.
        logits (bool): the ratio inputs are logits (the op applies the softmax, in at least
            float32) or the ratios themselves.
    """
    momentum: Optional[float] = 0.1
    eps: float = 1e-5
    logits: bool = True

    def __post_init__(self):
        _check_shared_options(self)


@dataclasses.dataclass(frozen=True)
class SWConfig:
    """An SW layer's options as its op reads them; names as in the authors' release.

    Attributes:
        num_pergroup (int): channels per whitening group.
        sw_type (int): 2, 3 or 5, which statistics are mixed (:data:`SW_STATISTICS`).
        T (int): Newton's iterations.
        momentum (float, optional): as for :class:`SNConfig`.
        eps (float): added to the diagonal of the mixed covariance.
        method (str): the inverse square root, 'newton' or 'eigh' (:data:`SW_METHODS`).
        logits (bool): as for :class:`SNConfig`.
    """
    num_pergroup: int = 16
    sw_type: int = 2
    T: int = 5
    momentum: Optional[float] = 0.1
    eps: float = 1e-5
    method: str = 'newton'
    logits: bool = True

    def __post_init__(self):
        check_positive_int('num_pergroup', self.num_pergroup)
        if self.sw_type not in SW_STATISTICS:
            raise ValueError(f'sw_type: expected one of {sorted(SW_STATISTICS)}, '
                             f'got {self.sw_type!r}')
        check_positive_int('T', self.T)
        if self.method not in SW_METHODS:
            raise ValueError(f"method: expected 'newton' or 'eigh', got {self.method!r}")
        _check_shared_options(self)
