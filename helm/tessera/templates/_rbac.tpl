{{/*
The operator's permissions: the one place to add or remove a rule. Three lists, by where a rule
applies; operator-rbac.yaml only binds them:

- tessera.rbac.servedRules: namespaced resources in each namespace the operator serves. With
  operator.watchNamespaces, a Role (and RoleBinding) in each of them; without, the ClusterRole.
- tessera.rbac.clusterRules: cluster-scoped resources, and cluster-wide reads of namespaced ones.
  Always the ClusterRole.
- tessera.rbac.ownRules: the release namespace (the operator's own). A Role there, when it holds
  anything the two lists above do not already grant.

Every verb is one a code path uses: tests/test_helm_chart.py derives the calls from operator/
(kubernetes client calls, kopf handlers, kopf's own watches) and fails on a missing rule and on
a rule nothing needs. No wildcards, no secrets, no update (server-side apply is a patch).
*/}}

{{- define "tessera.rbac.servedRules" -}}
# ModelDeployments: kopf watches them and patches its annotations; the operator reads one before
# reconciling, stamps the classes fingerprint annotation and writes status. (They are listed
# through the cluster-wide rule of tessera.rbac.clusterRules.)
- apiGroups: ["tessera.dev"]
  resources: ["modeldeployments"]
  verbs: ["get", "watch", "patch"]
- apiGroups: ["tessera.dev"]
  resources: ["modeldeployments/status"]
  verbs: ["patch"]
# The children the operator renders: server-side apply (create and patch), read by name (a name
# another owner holds is refused), list and delete (pruning), watch (kopf, for readiness).
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# InferencePools (Gateway API Inference Extension), where their CRD is installed: one per
# ModelDeployment, server-side applied (create and patch) after a read by name (a pool another
# owner holds is left alone). No delete: the garbage collector removes them with their owner.
- apiGroups: ["inference.networking.k8s.io"]
  resources: ["inferencepools"]
  verbs: ["get", "create", "patch"]
# Events on ModelDeployments and their children (the operator's and kopf's).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{- define "tessera.rbac.clusterRules" -}}
# AcceleratorClasses: kopf watches them; each reconcile lists them to plan.
- apiGroups: ["tessera.dev"]
  resources: ["acceleratorclasses"]
  verbs: ["list", "watch"]
# Every ModelDeployment's plan holds capacity on the shared nodes: planning counts them all.
- apiGroups: ["tessera.dev"]
  resources: ["modeldeployments"]
  verbs: ["list"]
# PowerBudgets: a kopf daemon per budget (its finalizer lifts the caps on deletion) reads the
# budget each round and writes its status.
- apiGroups: ["tessera.dev"]
  resources: ["powerbudgets"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["tessera.dev"]
  resources: ["powerbudgets/status"]
  verbs: ["patch"]
# RebalancePolicies: a kopf daemon per policy reads it each round and writes its status.
- apiGroups: ["tessera.dev"]
  resources: ["rebalancepolicies"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["tessera.dev"]
  resources: ["rebalancepolicies/status"]
  verbs: ["patch"]
# The rebalancer's snapshot (pods on the nodes in scope, in every namespace, and the PDBs that
# cover them) and its moves: evictions, which the API server checks against the PDBs.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["pods/eviction"]
  verbs: ["create"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list"]
# KubeVirt VMs the rebalancer may move (a RebalancePolicy whose movable.kinds has
# VirtualMachine): their VirtualMachineInstances, the migrations in flight, and the migrations
# it creates, in any namespace. Never the VMs' pods: they are not evicted.
- apiGroups: ["kubevirt.io"]
  resources: ["virtualmachineinstances"]
  verbs: ["list"]
- apiGroups: ["kubevirt.io"]
  resources: ["virtualmachineinstancemigrations"]
  verbs: ["list", "create"]
# Node capacity per AcceleratorClass (its nodeSelector), the nodes a PowerBudget or a
# RebalancePolicy covers.
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list"]
# kopf follows the CRDs, to serve a resource whose CRD is installed after the operator; the
# operator follows the InferencePool CRD's, to publish pools once it is installed.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.operator.watchNamespaces }}
# kopf serving some namespaces follows which of them exist.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}

{{- define "tessera.rbac.ownRules" -}}
{{- $namespaces := .Values.operator.watchNamespaces }}
{{- if and $namespaces (not (has .Release.Namespace $namespaces)) }}
# kopf posts events about cluster-scoped objects (AcceleratorClasses) in its own namespace.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
{{- if .Values.operator.leaderElection.enabled }}
# Leader election: one Lease. Kubernetes cannot limit create by name.
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  resourceNames: [{{ include "tessera.operator.fullname" . | quote }}]
  verbs: ["get", "patch"]
{{- end }}
{{- end }}
