r"""Applies (or with --dry_run prints) the Kubernetes manifests; see launch/k8s/manifest.py.

  python -m launch.k8s --name=tiny --image=REGISTRY/research:TAG --num_processes=2 \
      --gpus_per_process=8 --volume=runs-pvc:/runs [--kind=jobset] [--dry_run] \
      -- --config=experiments/pretrain/small.py --workdir=/runs/small
"""

import sys

from absl import app, flags

from launch.cluster.common import LaunchError, parse_env, passthrough, submit
from launch.k8s import manifest

_d = manifest.K8sOptions()
_NAME = flags.DEFINE_string('name', _d.name, 'Job name (DNS label; pod host names derive from it).')
_IMAGE = flags.DEFINE_string('image', _d.image, 'Container image holding this repository.')
_NAMESPACE = flags.DEFINE_string('namespace', _d.namespace, 'Namespace (empty: kubectl default).')
_KIND = flags.DEFINE_enum('kind', _d.kind, ['job', 'jobset'], 'Indexed Job + Service, or JobSet.')
_NUM = flags.DEFINE_integer('num_processes', _d.num_processes, 'Pods (= JAX processes).')
_GPUS = flags.DEFINE_integer('gpus_per_process', _d.gpus_per_process, 'GPUs per pod (0: none).')
_GPU_RESOURCE = flags.DEFINE_string('gpu_resource', _d.gpu_resource, 'GPU resource name.')
_CPU = flags.DEFINE_string('cpu', _d.cpu, 'CPU request per pod (empty: none).')
_MEMORY = flags.DEFINE_string('memory', _d.memory, 'Memory request per pod (empty: none).')
_PORT = flags.DEFINE_integer('port', _d.port, 'Coordinator port on pod 0.')
_ENV = flags.DEFINE_multi_string('env', [], 'NAME=VALUE in every pod (repeatable).')
_PYTHON = flags.DEFINE_string('python', _d.python, 'Python interpreter in the image.')
_MODULE = flags.DEFINE_string('module', _d.module, 'Module every pod runs.')
_WORKING_DIR = flags.DEFINE_string('working_dir', _d.working_dir, 'Container working directory.')
_VOLUMES = flags.DEFINE_multi_string('volume', [], 'CLAIM:/mount/path PVC mount (repeatable).')
_NODE_SELECTOR = flags.DEFINE_multi_string('node_selector', [], 'KEY=VALUE (repeatable).')
_SA = flags.DEFINE_string('service_account', _d.service_account, 'Pod service account.')
_SHM = flags.DEFINE_string('shm_size', _d.shm_size, 'In-memory /dev/shm size (empty: none).')
_MAX_RESTARTS = flags.DEFINE_integer('max_restarts', _d.max_restarts,
                                     'Restarts allowed (preemptions do not count for kind=job).')
_INIT_TIMEOUT = flags.DEFINE_integer('init_timeout_s', _d.init_timeout_s,
                                     'Seconds pods wait for each other at start.')
_DRY_RUN = flags.DEFINE_boolean('dry_run', False, 'Print the YAML and the kubectl command.')


def main(argv):
  try:
    selector = {}
    for item in _NODE_SELECTOR.value:
      k, sep, v = item.partition('=')
      if not sep:
        raise LaunchError(f'--node_selector={item!r}: expected KEY=VALUE.')
      selector[k] = v
    opts = manifest.K8sOptions(
        name=_NAME.value, image=_IMAGE.value, namespace=_NAMESPACE.value, kind=_KIND.value,
        num_processes=_NUM.value, gpus_per_process=_GPUS.value, gpu_resource=_GPU_RESOURCE.value,
        cpu=_CPU.value, memory=_MEMORY.value, port=_PORT.value, env=parse_env(_ENV.value),
        python=_PYTHON.value, module=_MODULE.value, working_dir=_WORKING_DIR.value,
        volumes=_VOLUMES.value, node_selector=selector, service_account=_SA.value,
        shm_size=_SHM.value, max_restarts=_MAX_RESTARTS.value,
        init_timeout_s=_INIT_TIMEOUT.value)
    text = manifest.to_yaml(manifest.manifests(opts, passthrough(argv)))
  except LaunchError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  kubectl = ['kubectl', 'apply', '-f', '-']
  if _DRY_RUN.value:
    sys.stdout.write(text)
    print('# would run: ' + ' '.join(kubectl) + '   (with the YAML above on stdin)')
    return 0
  return submit(kubectl, stdin=text)


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
