"""Moved to `deepseekmoe_jax.tokenizer` (sampling and generation need it without the trainer).

Temporary: re-exports the names still imported from here; import them from `deepseekmoe_jax.tokenizer` instead.
"""

from deepseekmoe_jax.tokenizer import BYTE_EOS_ID as BYTE_EOS_ID
from deepseekmoe_jax.tokenizer import BYTE_OFFSET as BYTE_OFFSET
from deepseekmoe_jax.tokenizer import ByteTokenizer as ByteTokenizer
from deepseekmoe_jax.tokenizer import HFTokenizer as HFTokenizer
from deepseekmoe_jax.tokenizer import Tokenizer as Tokenizer
from deepseekmoe_jax.tokenizer import TokenizerError as TokenizerError
from deepseekmoe_jax.tokenizer import load_tokenizer as load_tokenizer
from deepseekmoe_jax.tokenizer import tokenizer_from_arg as tokenizer_from_arg
