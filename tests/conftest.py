"""Test set-up: 8 fake CPU devices for every test, and absl flags marked parsed.

XLA_FLAGS must be set before JAX is first imported, so this runs at collection time.
grain 0.2.18's multiprocess workers read an absl flag and fail unless flags are parsed.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
