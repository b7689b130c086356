"""Which voice a data folder speaks with now."""

import os


def current_voice(data_dir):
    """The voice in use: `<data_dir>/voice` where a tune was promoted, else the night's `<data_dir>/final_model`."""
    promoted = os.path.join(data_dir, "voice")
    return promoted if os.path.isdir(promoted) else os.path.join(data_dir, "final_model")
