"""Keys and addresses the tests share."""

from __future__ import annotations

import hashlib
import os

# The real Redis of the `real` tests; they are skipped when it is unset (CI sets it).
REAL_REDIS_URL = os.environ.get("SPEND_GUARD_TEST_REDIS_URL", "")
ACCOUNT_KEY = "sk-account-" + "0" * 53
# alice's and bob's bearer keys; policies name a key by the SHA-256 of its bearer.
KEY_A = "sk-a-" + "a" * 59
KEY_B = "sk-b-" + "b" * 59
SHA_A = hashlib.sha256(KEY_A.encode()).hexdigest()
SHA_B = hashlib.sha256(KEY_B.encode()).hexdigest()
