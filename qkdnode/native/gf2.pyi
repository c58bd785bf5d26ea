import numpy as np
import numpy.typing as npt

BASE_WORDS: int

def have_clmul() -> bool: ...
def window_product(
    s: npt.NDArray[np.uint64],
    x: npt.NDArray[np.uint64],
    chunk_words: int,
    w0: int,
    w1: int,
    out: npt.NDArray[np.uint64],
    clmul: bool,
) -> None: ...
