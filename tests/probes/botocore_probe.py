"""Asks botocore's real IMDS credential provider for credentials, from a chosen loopback source address.

Used by the integration tests: the agent runs on loopback and identifies pods by source IP, so this
probe binds urllib3's connections to the address given in PROBE_SOURCE (a test shim that changes only
the source address; every request, header and parsing step is botocore's own). The IMDS endpoint comes
from AWS_EC2_METADATA_SERVICE_ENDPOINT, as a user would set it.

Prints one JSON object: {"found": bool, "access_key_id": ..., "method": ...}. Never prints secrets.
"""

import json
import os
import sys

import urllib3.connection

source = os.environ.get("PROBE_SOURCE")
if source:
    original_init = urllib3.connection.HTTPConnection.__init__

    def bound_init(self, *args, **kwargs):
        kwargs["source_address"] = (source, 0)
        original_init(self, *args, **kwargs)

    urllib3.connection.HTTPConnection.__init__ = bound_init

import botocore  # noqa: E402
import botocore.session  # noqa: E402
from botocore.credentials import InstanceMetadataProvider  # noqa: E402
from botocore.utils import InstanceMetadataFetcher  # noqa: E402

session = botocore.session.get_session()
fetcher = InstanceMetadataFetcher(
    timeout=2,
    num_attempts=2,
    config={"ec2_metadata_service_endpoint": os.environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"]},
)
credentials = InstanceMetadataProvider(iam_role_fetcher=fetcher).load()
if credentials is None:
    print(json.dumps({"found": False, "botocore": botocore.__version__}))
    sys.exit(0)
frozen = credentials.get_frozen_credentials()
print(
    json.dumps(
        {
            "found": True,
            "botocore": botocore.__version__,
            "access_key_id": frozen.access_key,
            "method": credentials.method,
        }
    )
)
