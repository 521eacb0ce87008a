"""The Knative Service that runs the zeroserve image and scales to zero, as a plain dict.

The cold-start settings follow from one number, the expected cold start C (seconds from a request reaching a
service at zero until a pod answers it: image start, model download, session build, TensorRT engine build,
warm-up); ``zeroserve.render_options.Budget`` has the rules. ``zeroserve.render`` puts this next to the KServe
and Eventing manifests and writes the whole tree.
"""

from __future__ import annotations

from zeroserve import podspec
from zeroserve.render_options import Manifest, RenderOptions

__all__ = ["knative_service"]


def knative_service(options: RenderOptions) -> Manifest:
    """A Knative Service running the image, scaling to zero with the KPA."""
    budget = options.budget
    # A repository's models are served under their folders' names.
    model_name = None if options.serves_repository else options.served_name
    annotations = {
        "autoscaling.knative.dev/class": "kpa.autoscaling.knative.dev",
        "autoscaling.knative.dev/metric": "concurrency",
        "autoscaling.knative.dev/target": str(options.target_concurrency),
        "autoscaling.knative.dev/min-scale": str(options.min_scale),
        "autoscaling.knative.dev/max-scale": str(options.max_scale),
        "autoscaling.knative.dev/scale-down-delay": f"{budget.scale_down_delay}s",
        "serving.knative.dev/progress-deadline": f"{budget.progress_deadline}s",
    }
    container: Manifest = {
        "name": "zeroserve",
        "image": options.resolved_image,
        "args": [*podspec.container_args(options, options.model_uri, model_name), *podspec.loading_args(options)],
        "ports": [podspec.port(options)],
        **podspec.env(options),
        **podspec.probes(options),
        **podspec.resources(options),
        **podspec.hardening(),
    }
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": podspec.metadata(options.name, options.namespace),
        "spec": {
            "template": {
                "metadata": {"annotations": annotations},
                "spec": {
                    **podspec.pod_settings(options),
                    "containerConcurrency": options.container_concurrency,
                    "timeoutSeconds": budget.timeout,
                    "responseStartTimeoutSeconds": budget.response_start_timeout,
                    "containers": [container],
                    "volumes": podspec.volumes(),
                },
            }
        },
    }
