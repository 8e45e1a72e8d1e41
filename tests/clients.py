"""The three client protocols behind one call: KServe JSON over HTTP (requests), the
HTTP binary tensor extension (tritonclient.http) and gRPC (tritonclient.grpc). Inputs
and outputs are numpy arrays, BYTES as str objects."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient




def infer_path(model: str, version: str | None) -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"


def json_tensor(name: str, array: np.ndarray) -> dict:
    datatype = "BYTES" if array.dtype == object else "INT64"
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": datatype,
        "data": array.flatten().tolist(),
    }


def from_json_tensor(output: dict) -> np.ndarray:
    dtype = object if output["datatype"] == "BYTES" else np.float32
    return np.array(output["data"], dtype=dtype).reshape(output["shape"])


def _decoded(array: np.ndarray) -> np.ndarray:
    if array.dtype == object:
        return np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(array)
    return array


def _datatype(array: np.ndarray) -> str:
    return "BYTES" if array.dtype == object else "INT64"


class Clients:
    """One server's HTTP (JSON and binary) and gRPC clients behind a single `infer`."""

    def __init__(self, server, outputs_by_model: dict[str, tuple[str, ...]]):
        self.server = server
        # Outputs requested when a call names none (binary outputs must be requested).
        self.outputs_by_model = outputs_by_model
        self.http = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
        self.grpc = grpcclient.InferenceServerClient(server.grpc_url)

    def close(self) -> None:
        self.http.close()
        self.grpc.close()

    def infer(
        self, protocol, model, version, inputs, outputs=None, parameters=None
    ) -> dict[str, np.ndarray]:
        """Runs one request; returns its outputs by name. `version=None`: unversioned."""
        return getattr(self, f"_infer_{protocol}")(model, version, inputs, outputs, parameters)

    def _infer_json(self, model, version, inputs, outputs, parameters):
        body = {"inputs": [json_tensor(name, array) for name, array in inputs.items()]}
        if parameters:
            body["parameters"] = parameters
        if outputs is not None:
            body["outputs"] = [{"name": name} for name in outputs]
        response = self.server.post(infer_path(model, version), body)
        assert response.status_code == 200, response.text[:2000]
        result = response.json()
        assert result["model_name"] == model
        if version:
            assert result["model_version"] == version
        return {output["name"]: from_json_tensor(output) for output in result["outputs"]}

    def _infer_binary(self, model, version, inputs, outputs, parameters):
        return self._infer_client(httpclient, self.http, model, version, inputs, outputs, parameters)

    def _infer_grpc(self, model, version, inputs, outputs, parameters):
        return self._infer_client(grpcclient, self.grpc, model, version, inputs, outputs, parameters)

    def _infer_client(self, module, client, model, version, inputs, outputs, parameters):
        # The HTTP client sends and receives every tensor in the binary extension.
        binary = {"binary_data": True} if module is httpclient else {}
        tensors = []
        for name, array in inputs.items():
            tensor = module.InferInput(name, list(array.shape), _datatype(array))
            tensor.set_data_from_numpy(array, **binary)
            tensors.append(tensor)
        names = outputs if outputs is not None else self.outputs_by_model[model]
        requested = [module.InferRequestedOutput(name, **binary) for name in names]
        result = client.infer(
            model,
            tensors,
            model_version=version or "",
            outputs=requested,
            parameters=parameters or None,
        )
        response = result.get_response()
        returned = response["outputs"] if module is httpclient else response.outputs
        names = [o["name"] if module is httpclient else o.name for o in returned]
        return {name: _decoded(result.as_numpy(name)) for name in names}
