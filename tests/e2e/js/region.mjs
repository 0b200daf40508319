// AWS SDK for JavaScript v3 region probe for the end-to-end suite, run inside a pod's network namespace.
// JS v3's default region chain never asks IMDS; on EC2 the SDK's own MetadataService is how a JS v3
// program learns its region (IMDSv2 token first, as the credential provider does). Prints one JSON
// line: {region, version} or {error}.
import { createRequire } from "node:module";
import { MetadataService } from "@aws-sdk/ec2-metadata-service";

const require = createRequire(import.meta.url);
const version = require("@aws-sdk/ec2-metadata-service/package.json").version;
const service = new MetadataService({ httpOptions: { timeout: 2000 }, retries: 0 });
try {
  const region = await service.request("/latest/meta-data/placement/region", {});
  console.log(JSON.stringify({ region, version }));
} catch (error) {
  console.log(JSON.stringify({ error: `${error.name}: ${error.message}`, version }));
  process.exit(1);
}
