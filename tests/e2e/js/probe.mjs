// AWS SDK for JavaScript v3 probe for the end-to-end suite, run inside a pod's network namespace:
// fromInstanceMetadata() against 169.254.169.254 (no endpoint override), then GetCallerIdentity at
// AWS_ENDPOINT_URL_STS. Prints one JSON line: {arn, account, user_id, version} or {error, no_credentials}.
import { createRequire } from "node:module";
import { fromInstanceMetadata } from "@aws-sdk/credential-providers";
import { STSClient, GetCallerIdentityCommand } from "@aws-sdk/client-sts";

const require = createRequire(import.meta.url);
const version = require("@aws-sdk/credential-providers/package.json").version;
const imdsVersion = require("@smithy/credential-provider-imds/package.json").version;
const versions = { "@aws-sdk/credential-providers": version, "@smithy/credential-provider-imds": imdsVersion };

function fail(error, noCredentials) {
  console.log(JSON.stringify({ error: String(error), no_credentials: noCredentials, versions }));
  process.exit(1);
}

const provider = fromInstanceMetadata({ timeout: 1000, maxRetries: 0 });
let credentials;
try {
  credentials = await provider();
} catch (error) {
  fail(`${error.name}: ${error.message}`, true);
}
const sts = new STSClient({
  region: "us-east-1",
  endpoint: process.env.AWS_ENDPOINT_URL_STS,
  credentials,
});
try {
  const identity = await sts.send(new GetCallerIdentityCommand({}));
  console.log(JSON.stringify({ arn: identity.Arn, account: identity.Account, user_id: identity.UserId, versions }));
} catch (error) {
  fail(`GetCallerIdentity: ${error.name}: ${error.message}`, false);
}
