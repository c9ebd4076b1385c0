#!/usr/bin/env python3
"""Known-answer vectors for `credentials.source = "aws-iam"`, made with botocore (the AWS SDK
for Python), exactly as AWS's ElastiCache / MemoryDB IAM documentation generates a token:
RequestSigner.generate_presigned_url of `GET https://<cache>/?Action=connect&User=<user>`
(plus `ResourceType=ServerlessCache` for a serverless cache), expires_in 900, the scheme
removed. The signing time is fixed by patching botocore's clock.

    python3 -m pip install --target /tmp/boto botocore
    PYTHONPATH=/tmp/boto python3 tests/vectors/make_aws_iam_vectors.py > tests/vectors/aws_iam.json
"""
import datetime
import json
from unittest import mock
from urllib.parse import ParseResult, urlencode, urlunparse

import botocore
import botocore.auth
import botocore.session
from botocore.credentials import Credentials
from botocore.model import ServiceId
from botocore.signers import RequestSigner

CASES = [
    # name, service, region, cache, user, serverless, access key, secret, session token, time
    ("elasticache", "elasticache", "eu-west-1", "my-cache", "app-user", False,
     "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None, "2026-12-03T09:00:00Z"),
    ("elasticache-serverless", "elasticache", "us-east-1", "serverless-cache", "iam-user-01", True,
     "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None, "2026-01-15T23:59:59Z"),
    ("memorydb-sts", "memorydb", "ap-southeast-2", "cluster-1", "app", False,
     "ASIAEXAMPLETEMP", "tempSecret/with+plus=and=equals",
     "FwoGZXIvYXdzEBYaDH+session/token==", "2026-06-30T12:34:56Z"),
]


def token(service, region, cache, user, serverless, key, secret, session_token, at):
    credentials = Credentials(key, secret, session_token)
    session = botocore.session.get_session()
    signer = RequestSigner(ServiceId(service), region, service, "v4", credentials, session.get_component("event_emitter"))
    query = {"Action": "connect", "User": user}
    if serverless:
        query["ResourceType"] = "ServerlessCache"
    url = urlunparse(ParseResult(scheme="https", netloc=cache, path="/", query=urlencode(query), params="", fragment=""))
    when = datetime.datetime.strptime(at, "%Y-%m-%dT%H:%M:%SZ")
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=when, create=True), \
         mock.patch("botocore.auth.datetime") as fake:
        fake.datetime.utcnow.return_value = when
        fake.datetime.now.return_value = when.replace(tzinfo=datetime.timezone.utc)
        fake.datetime.strptime = datetime.datetime.strptime
        fake.timezone = datetime.timezone
        signed = signer.generate_presigned_url(
            {"method": "GET", "url": url, "body": {}, "headers": {}, "context": {}},
            operation_name="connect", expires_in=900, region_name=region)
    return signed.removeprefix("https://")


vectors = []
for name, service, region, cache, user, serverless, key, secret, session_token, at in CASES:
    vectors.append({
        "name": name, "service": service, "region": region, "cache_name": cache, "user": user,
        "serverless": serverless, "access_key_id": key, "secret_access_key": secret,
        "session_token": session_token, "time": at,
        "token": token(service, region, cache, user, serverless, key, secret, session_token, at),
    })
print(json.dumps({"made_with": f"botocore {botocore.__version__}", "vectors": vectors}, indent=2))
