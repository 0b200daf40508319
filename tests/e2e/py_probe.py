"""Python SDK probe for the end-to-end suite, run inside a pod's network namespace.

Works with current boto3/botocore and with botocore 1.13.22 (the last release before IMDSv2). Nothing is
configured but the STS endpoint (AWS_ENDPOINT_URL_STS, passed explicitly because old botocore does not
read it), so only the instance-metadata provider can supply credentials. Prints one JSON line:
{"arn", "account", "user_id", "method", "versions"} or {"error", "no_credentials", "versions"}; exit 1 on error.
"""

import json
import os
import sys


def main() -> int:
    import botocore
    import botocore.session

    versions = {"botocore": botocore.__version__}
    try:
        import boto3

        versions["boto3"] = boto3.__version__
    except ImportError:
        pass

    def fail(error: str, no_credentials: bool) -> int:
        print(json.dumps({"error": error, "no_credentials": no_credentials, "versions": versions}))
        return 1

    session = botocore.session.get_session()
    try:
        credentials = session.get_credentials()
    except Exception as error:  # noqa: BLE001 - every failure is reported, as the SDK would raise it
        return fail(f"{type(error).__name__}: {error}", True)
    if credentials is None:
        return fail("no credentials found", True)
    client = session.create_client(
        "sts", region_name="us-east-1", endpoint_url=os.environ["AWS_ENDPOINT_URL_STS"]
    )
    try:
        identity = client.get_caller_identity()
    except Exception as error:  # noqa: BLE001
        return fail(f"GetCallerIdentity: {type(error).__name__}: {error}", False)
    print(
        json.dumps(
            {
                "arn": identity["Arn"],
                "account": identity["Account"],
                "user_id": identity["UserId"],
                "method": credentials.method,
                "versions": versions,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
