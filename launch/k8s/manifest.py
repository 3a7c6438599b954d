r"""Kubernetes manifests for a multi-process GPU job: an indexed Job (or a JobSet).

``--kind=job`` (default, plain Kubernetes >= 1.27): a headless Service and an
Indexed Job with ``completions = parallelism = num_processes``. Pod ``i`` is
process ``i``: the Job controller sets ``JOB_COMPLETION_INDEX`` in its env and its
hostname to ``NAME-i``; the Service makes ``NAME-0.NAME`` resolve to pod 0, the
coordinator. Every pod gets ``JAX_COORDINATOR_ADDRESS=NAME-0.NAME:PORT`` and
``JAX_NUM_PROCESSES``, which ``research/distributed.py`` reads.

``--kind=jobset`` (the JobSet controller installed): one replicated Job of
``num_processes`` pods; JobSet creates the headless Service itself and pod 0 is
``NAME-workers-0-0.NAME``.

Failure policy: exit code 75 (clean preemption save) and node disruptions restart
the pods without counting as failures (they resume from the checkpoint); any other
failure of one pod fails the whole Job, which stops the other pods.

The trainer's argv is written as a YAML list (no shell): any argument value is safe.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

from launch.cluster.common import LaunchError, program
from research import gpu_env
from research.runtime import EXIT_PREEMPTED

_DNS_LABEL = re.compile(r'^[a-z]([-a-z0-9]*[a-z0-9])?$')


@dataclasses.dataclass
class K8sOptions:
  name: str = 'research'
  image: str = ''
  namespace: str = ''
  kind: str = 'job'  # 'job' | 'jobset'
  num_processes: int = 2
  gpus_per_process: int = 8
  gpu_resource: str = 'nvidia.com/gpu'
  cpu: str = ''  # Requests per pod, e.g. '32'.
  memory: str = ''  # e.g. '200Gi'.
  port: int = 1234
  env: dict[str, str] = dataclasses.field(default_factory=dict)
  python: str = 'python'
  module: str = 'launch.train'
  working_dir: str = ''  # Container working directory ('' -> the image's).
  volumes: Sequence[str] = ()  # 'CLAIM:/mount/path' PersistentVolumeClaims.
  node_selector: dict[str, str] = dataclasses.field(default_factory=dict)
  service_account: str = ''
  shm_size: str = '16Gi'  # /dev/shm for NCCL; '' -> none.
  max_restarts: int = 20  # Preemption restarts allowed (Job backoffLimit / JobSet).
  init_timeout_s: int = 900  # Pods may wait long for images and nodes.


def _check(o: K8sOptions) -> None:
  if not _DNS_LABEL.match(o.name) or len(o.name) > 40:
    raise LaunchError(f'--name={o.name!r}: lowercase letters, digits and "-", starting with a '
                      'letter, at most 40 characters (it becomes pod host names).')
  if not o.image:
    raise LaunchError('--image is required (the container image holding this repo).')
  if o.kind not in ('job', 'jobset'):
    raise LaunchError(f'--kind={o.kind!r}: expected job or jobset.')
  if o.num_processes < 1:
    raise LaunchError('--num_processes must be >= 1.')


def coordinator_host(o: K8sOptions) -> str:
  if o.kind == 'jobset':
    return f'{o.name}-workers-0-0.{o.name}'
  return f'{o.name}-0.{o.name}'


def _pod_spec(o: K8sOptions, args: Sequence[str]) -> dict[str, Any]:
  argv = program(o.python, o.module, [*args, f'--distributed_init_timeout_s={o.init_timeout_s}'])
  env = [
      {'name': 'JAX_COORDINATOR_ADDRESS', 'value': f'{coordinator_host(o)}:{o.port}'},
      {'name': 'JAX_NUM_PROCESSES', 'value': str(o.num_processes)},
      {'name': 'PYTHONUNBUFFERED', 'value': '1'},
  ] + [{'name': k, 'value': v} for k, v in o.env.items()]
  if o.gpus_per_process:  # XLA/NCCL flags and memory fraction (research/gpu_env.py).
    extra = gpu_env.gpu_env(o.env)
    env = [e for e in env if e['name'] not in extra] + [
        {'name': k, 'value': v} for k, v in extra.items()]
  resources: dict[str, Any] = {}
  if o.gpus_per_process:
    resources['limits'] = {o.gpu_resource: o.gpus_per_process}
  requests = {k: v for k, v in (('cpu', o.cpu), ('memory', o.memory)) if v}
  if requests:
    resources['requests'] = requests
  container: dict[str, Any] = {
      'name': 'train', 'image': o.image, 'command': argv, 'env': env,
      'ports': [{'containerPort': o.port, 'name': 'coordinator'}],
  }
  if resources:
    container['resources'] = resources
  if o.working_dir:
    container['workingDir'] = o.working_dir
  volumes, mounts = [], []
  if o.shm_size:
    volumes.append({'name': 'dshm', 'emptyDir': {'medium': 'Memory', 'sizeLimit': o.shm_size}})
    mounts.append({'name': 'dshm', 'mountPath': '/dev/shm'})
  for i, v in enumerate(o.volumes):
    claim, sep, path = v.partition(':')
    if not sep or not claim or not path.startswith('/'):
      raise LaunchError(f'--volume={v!r}: expected CLAIM:/mount/path.')
    volumes.append({'name': f'vol{i}', 'persistentVolumeClaim': {'claimName': claim}})
    mounts.append({'name': f'vol{i}', 'mountPath': path})
  if mounts:
    container['volumeMounts'] = mounts
  spec: dict[str, Any] = {'restartPolicy': 'Never', 'containers': [container]}
  if volumes:
    spec['volumes'] = volumes
  if o.node_selector:
    spec['nodeSelector'] = dict(o.node_selector)
  if o.gpus_per_process:
    spec['tolerations'] = [{'key': o.gpu_resource, 'operator': 'Exists',
                            'effect': 'NoSchedule'}]
  if o.service_account:
    spec['serviceAccountName'] = o.service_account
  return spec


def _failure_policy() -> dict[str, Any]:
  return {'rules': [
      # A clean preemption save: restart the pod, don't count it as a failure.
      {'action': 'Ignore', 'onExitCodes': {'containerName': 'train', 'operator': 'In',
                                           'values': [EXIT_PREEMPTED]}},
      # Node drain / eviction / preemption by a higher-priority pod.
      {'action': 'Ignore', 'onPodConditions': [{'type': 'DisruptionTarget'}]},
      # Anything else: fail the whole job now (the other pods are stopped).
      {'action': 'FailJob', 'onExitCodes': {'containerName': 'train', 'operator': 'NotIn',
                                            'values': [0]}},
  ]}


def _meta(o: K8sOptions, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
  m: dict[str, Any] = {'name': name}
  if o.namespace:
    m['namespace'] = o.namespace
  if labels:
    m['labels'] = dict(labels)
  return m


def manifests(o: K8sOptions, args: Sequence[str]) -> list[dict[str, Any]]:
  """The Kubernetes objects (apply them in order)."""
  _check(o)
  labels = {'app.kubernetes.io/name': o.name}
  pod_spec = _pod_spec(o, args)
  if o.kind == 'jobset':
    job_template = {
        'spec': {
            'completionMode': 'Indexed', 'completions': o.num_processes,
            'parallelism': o.num_processes, 'backoffLimit': 0,
            'template': {'metadata': {'labels': dict(labels)}, 'spec': pod_spec},
        }}
    return [{
        'apiVersion': 'jobset.x-k8s.io/v1alpha2', 'kind': 'JobSet',
        'metadata': _meta(o, o.name, labels),
        'spec': {
            'network': {'enableDNSHostnames': True, 'publishNotReadyAddresses': True},
            # Any pod failing restarts the whole set (all pods resume together).
            'failurePolicy': {'maxRestarts': o.max_restarts},
            'replicatedJobs': [{'name': 'workers', 'replicas': 1, 'template': job_template}],
        }}]
  pod_spec['subdomain'] = o.name  # NAME-i.NAME resolves through the headless Service.
  service = {
      'apiVersion': 'v1', 'kind': 'Service', 'metadata': _meta(o, o.name, labels),
      'spec': {'clusterIP': 'None', 'publishNotReadyAddresses': True,
               'selector': {'job-name': o.name},
               'ports': [{'name': 'coordinator', 'port': o.port}]},
  }
  job = {
      'apiVersion': 'batch/v1', 'kind': 'Job', 'metadata': _meta(o, o.name, labels),
      'spec': {
          'completionMode': 'Indexed', 'completions': o.num_processes,
          'parallelism': o.num_processes, 'backoffLimit': o.max_restarts,
          'podFailurePolicy': _failure_policy(),
          'template': {'metadata': {'labels': dict(labels)}, 'spec': pod_spec},
      }}
  return [service, job]


def to_yaml(objs: list[dict[str, Any]]) -> str:
  import yaml
  return yaml.safe_dump_all(objs, sort_keys=False, default_flow_style=False, width=1000)
