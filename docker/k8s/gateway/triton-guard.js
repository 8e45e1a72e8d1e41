// Request guard in front of Triton's HTTP endpoint (see nginx.conf).
//
// tritonserver up to at least 25.10 parses HTTP JSON recursively: a body nested some
// 30,000 levels deep exhausts an HTTP thread's stack and kills the whole server
// (SIGSEGV). njs's JSON.parse refuses nesting deeper than 32 levels (a KServe v2 body
// needs 4 plus the tensor rank), so every JSON document is parsed here first and a
// request Triton could choke on never reaches it. Malformed JSON gets a 400 here
// (Triton itself answers it with a 500).

function refuse(r, status, message) {
    r.headersOut['Content-Type'] = 'application/json';
    r.return(status, JSON.stringify({ error: message }));
}

// The JSON part of a body: all of it, or the first Inference-Header-Content-Length bytes
// when the request uses the binary tensor extension.
function jsonPart(r, body) {
    const declared = r.headersIn['Inference-Header-Content-Length'];
    if (declared === undefined) {
        return body;
    }
    if (!/^[0-9]+$/.test(declared) || Number(declared) > body.length) {
        throw new Error(`Inference-Header-Content-Length ${declared} is not a length within the ${body.length}-byte body`);
    }
    return body.slice(0, Number(declared));
}

function check(r) {
    const encoding = r.headersIn['Content-Encoding'];
    if (encoding !== undefined && encoding.toLowerCase() !== 'identity') {
        // A compressed body would reach Triton's parser unchecked (and unbounded).
        refuse(r, 415, `Content-Encoding ${encoding} is not accepted here: send the body uncompressed`);
        return;
    }
    const body = r.requestBuffer;
    if (body !== undefined && body.length > 0) {
        let document;
        try {
            document = JSON.parse(jsonPart(r, body).toString());
            // A model load carries a whole model config as a JSON string that Triton
            // parses again.
            const config = document && document.parameters && document.parameters.config;
            if (typeof config === 'string' && r.uri.startsWith('/v2/repository/')) {
                JSON.parse(config);
            }
        } catch (e) {
            refuse(r, 400, `request body refused by the gateway: ${e.message} (JSON is limited to 32 levels of nesting)`);
            return;
        }
    }
    r.internalRedirect('@triton');
}

export default { check };
