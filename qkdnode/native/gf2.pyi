import numpy as np
import numpy.typing as npt

BASE_WORDS: int

def available_kernels() -> tuple[str, ...]: ...
def product_words(
    s: npt.NDArray[np.uint64],
    x: npt.NDArray[np.uint64],
    w0: int,
    out: npt.NDArray[np.uint64],
    kernel: str,
) -> None: ...
