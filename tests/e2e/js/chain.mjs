// AWS SDK for JavaScript v3, default credential chain, for the end-to-end suite: an STS client given
// no credentials finds them itself (environment, files, web identity, the container endpoint named by
// AWS_CONTAINER_CREDENTIALS_FULL_URI, then IMDS), then calls GetCallerIdentity at AWS_ENDPOINT_URL_STS.
// Prints one JSON line: {arn, account, user_id, versions} or {error, no_credentials, versions}.
import { createRequire } from "node:module";
import { STSClient, GetCallerIdentityCommand } from "@aws-sdk/client-sts";

const require = createRequire(import.meta.url);
const versions = {
  "@aws-sdk/client-sts": require("@aws-sdk/client-sts/package.json").version,
  "@aws-sdk/credential-provider-http": require("@aws-sdk/credential-provider-http/package.json").version,
};

const sts = new STSClient({ region: "us-east-1", endpoint: process.env.AWS_ENDPOINT_URL_STS });
// Asked first, so that "no credentials" is told apart from an STS failure.
try {
  await sts.config.credentials();
} catch (error) {
  console.log(JSON.stringify({ error: `${error.name}: ${error.message}`, no_credentials: true, versions }));
  process.exit(1);
}
try {
  const identity = await sts.send(new GetCallerIdentityCommand({}));
  console.log(JSON.stringify({ arn: identity.Arn, account: identity.Account, user_id: identity.UserId, versions }));
} catch (error) {
  console.log(JSON.stringify({ error: `GetCallerIdentity: ${error.name}: ${error.message}`, no_credentials: false, versions }));
  process.exit(1);
}
