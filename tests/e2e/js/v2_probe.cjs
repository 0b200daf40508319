// AWS SDK for JavaScript v2 probe for the end-to-end suite (aws-sdk 2.574.0, pinned in package.json),
// run inside a pod's network namespace: the default credential provider chain
// (AWS.CredentialProviderChain.defaultProviders: environment, shared file, ECS/container, process, web
// identity, instance metadata), then GetCallerIdentity at AWS_ENDPOINT_URL_STS (passed explicitly: this
// release does not read it). Prints one JSON line: {arn, account, user_id, provider, version} or
// {error, no_credentials, version}; exit 1 on error.
const AWS = require("aws-sdk");

const versions = { "aws-sdk": AWS.VERSION };

function emit(fields, code) {
  console.log(JSON.stringify({ ...fields, versions }));
  process.exit(code);
}

async function main() {
  let credentials;
  try {
    credentials = await new AWS.CredentialProviderChain().resolvePromise();
  } catch (error) {
    emit({ error: `${error.code || error.name}: ${error.message}`, no_credentials: true }, 1);
  }
  const sts = new AWS.STS({
    region: "us-east-1",
    endpoint: process.env.AWS_ENDPOINT_URL_STS,
    credentials,
    maxRetries: 0,
  });
  try {
    const identity = await sts.getCallerIdentity({}).promise();
    emit({ arn: identity.Arn, account: identity.Account, user_id: identity.UserId,
           provider: credentials.constructor.name }, 0);
  } catch (error) {
    emit({ error: `GetCallerIdentity: ${error.code || error.name}: ${error.message}`, no_credentials: false }, 1);
  }
}

main();
