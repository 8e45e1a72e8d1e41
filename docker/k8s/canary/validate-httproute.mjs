// Validates HTTPRoutes against the Gateway API schema (npm @kubernetes-models/gateway-api),
// offline. Input: a JSON array of documents on stdin; SCHEMA_MODULE: the package's
// directory. A broken copy of each route must be refused, or the check proves nothing.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modulePath = join(process.env.SCHEMA_MODULE, "gateway.networking.k8s.io", "v1", "index.js");
const { HTTPRoute } = await import(pathToFileURL(modulePath).href);
const documents = JSON.parse(readFileSync(0, "utf8")).filter((d) => d && d.kind === "HTTPRoute");
if (documents.length === 0) {
  console.error("no HTTPRoute in the input");
  process.exit(1);
}
for (const route of documents) {
  new HTTPRoute(route).validate(); // throws with the failing path
  const weights = route.spec.rules.flatMap((rule) => rule.backendRefs.map((ref) => ref.weight));
  if (weights.reduce((a, b) => a + b, 0) !== 100) {
    console.error(`HTTPRoute ${route.metadata.name}: weights ${weights} do not sum to 100`);
    process.exit(1);
  }
  const broken = structuredClone(route);
  broken.spec.rules[0].backendRefs[0].weight = "ninety";
  let refused = false;
  try {
    new HTTPRoute(broken).validate();
  } catch {
    refused = true;
  }
  if (!refused) {
    console.error("the validator accepted a route with a string weight");
    process.exit(1);
  }
  console.log(`HTTPRoute ${route.metadata.name}: valid (weights ${weights.join("/")})`);
}
