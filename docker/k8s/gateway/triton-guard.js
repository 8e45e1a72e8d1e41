// Request guard in front of Triton's HTTP endpoint (see nginx.conf).
//
// tritonserver up to at least 25.10 parses HTTP JSON recursively: a body nested some
// 30,000 levels deep exhausts an HTTP thread's stack and kills the whole server
// (SIGSEGV). njs's JSON.parse refuses nesting deeper than 32 levels (a KServe v2 body
// needs 4 plus the tensor rank), so every JSON document is parsed here first and a
// request Triton could choke on never reaches it. Malformed JSON gets a 400 here
// (Triton itself answers it with a 500).
//
// Triton 2.51 also allocates an inference input's JSON `data` at the size its `shape`
// declares before it compares the two: `"shape": [1099511627776]` with one value makes
// a 100-byte body abort the server (std::bad_alloc), and [2000000000] takes 8 GB and
// 20 s. So an input whose `data` does not hold exactly as many values as its shape is
// refused here.

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

// How many values a JSON tensor's `data` holds, flat or nested as the shape (njs's
// 32-level nesting limit bounds the recursion).
function valueCount(data) {
    if (!Array.isArray(data)) {
        return 1;
    }
    let count = 0;
    for (let i = 0; i < data.length; i++) {
        count += valueCount(data[i]);
    }
    return count;
}

// The first inference input whose `data` does not fill its `shape` exactly, as an error
// message; Triton gets the rest (and refuses a shape that is not a list of integers).
function shapeMismatch(document) {
    const inputs = document && document.inputs;
    if (!Array.isArray(inputs)) {
        return undefined;
    }
    for (let i = 0; i < inputs.length; i++) {
        const input = inputs[i];
        if (!input || !Array.isArray(input.shape) || input.data === undefined) {
            continue;
        }
        let declared = 1;
        for (let d = 0; d < input.shape.length; d++) {
            declared *= Number(input.shape[d]);
        }
        const held = valueCount(input.data);
        if (declared !== held) {
            const values = declared === 1 ? 'value' : 'values';
            return `input '${input.name}' has shape [${input.shape.join(',')}], which holds ${declared} ${values}, but its 'data' has ${held}`;
        }
    }
    return undefined;
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
        const mismatch = /\/infer$/.test(r.uri) ? shapeMismatch(document) : undefined;
        if (mismatch !== undefined) {
            refuse(r, 400, `request body refused by the gateway: ${mismatch}`);
            return;
        }
    }
    r.internalRedirect('@triton');
}

export default { check };
