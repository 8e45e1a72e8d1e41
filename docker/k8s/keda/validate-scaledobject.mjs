// Validates ScaledObjects against KEDA's schema (npm @kubernetes-models/keda), offline.
// Input: a JSON array of documents on stdin; SCHEMA_MODULE: the package's directory. A
// broken copy of each must be refused, or the check proves nothing.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modulePath = join(process.env.SCHEMA_MODULE, "keda.sh", "v1alpha1", "index.js");
const { ScaledObject } = await import(pathToFileURL(modulePath).href);
const documents = JSON.parse(readFileSync(0, "utf8")).filter((d) => d && d.kind === "ScaledObject");
if (documents.length === 0) {
  console.error("no ScaledObject in the input");
  process.exit(1);
}
for (const scaled of documents) {
  new ScaledObject(scaled).validate(); // throws with the failing path
  const broken = structuredClone(scaled);
  broken.spec.minReplicaCount = "two";
  let refused = false;
  try {
    new ScaledObject(broken).validate();
  } catch {
    refused = true;
  }
  if (!refused) {
    console.error("the validator accepted a ScaledObject with a string minReplicaCount");
    process.exit(1);
  }
  console.log(`ScaledObject ${scaled.metadata.name}: valid (${scaled.spec.triggers.length} triggers)`);
}
