{{/* Chart name, overridable. 63: the DNS-1123 label limit of names and label values. */}}
{{- define "batchpilot.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: the release name, with the chart name unless it already contains it. */}}
{{- define "batchpilot.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels on every object the chart renders. */}}
{{- define "batchpilot.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "batchpilot.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: batchpilot
{{- end }}

{{/* The operator pod's identity: the Deployment, Service and PDB select by these. */}}
{{- define "batchpilot.selectorLabels" -}}
app.kubernetes.io/name: {{ include "batchpilot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "batchpilot.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "batchpilot.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository@digest when a digest is set (immutable), else repository:tag. */}}
{{- define "batchpilot.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Prometheus `job` label of the operator's series: a ServiceMonitor names
     the job after the Service it scrapes. */}}
{{- define "batchpilot.metricsJob" -}}
{{ include "batchpilot.fullname" . }}-metrics
{{- end }}

{{/*
Contradictory values fail the render here, once, with the keys to change.
values.schema.json catches wrong types and unknown keys; this catches
combinations a schema cannot express readably.
*/}}
{{- define "batchpilot.validateValues" -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled=true needs metrics.enabled=true: the ServiceMonitor scrapes the metrics Service, which metrics.enabled=false removes" }}
{{- end }}
{{- if and .Values.prometheusRule.enabled (not .Values.metrics.enabled) }}
{{- fail "prometheusRule.enabled=true needs metrics.enabled=true: every alert reads the operator's own metrics" }}
{{- end }}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) }}
{{- fail "serviceAccount.create=false needs serviceAccount.name: the name of the existing ServiceAccount the operator runs as" }}
{{- end }}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.port) (int .Values.health.port)) }}
{{- fail (printf "metrics.port and health.port are both %d: the metrics server and kopf's liveness server need different ports" (int .Values.metrics.port)) }}
{{- end }}
{{- if not (hasKey .Values.config.prometheus "default") }}
{{- fail "config.prometheus needs an entry named default: policies without spec.metrics.endpoint query it" }}
{{- end }}
{{- end }}

{{/*
Who owns a live object, when it is not this release: "Helm release R in
namespace N", "no Helm release (...)", or "" when the object is absent or this
release's own. Called as (list $ $live), $live from `lookup`. Helm's own error
for such an object, "invalid ownership metadata", names neither the owner nor
the value to change; the callers fail with both instead. `lookup` reads the
cluster on install and upgrade only: `helm template` and --dry-run=client get
nothing, so GitOps renderings (Argo CD) are never refused here.
*/}}
{{- define "batchpilot.otherOwner" -}}
{{- $root := index . 0 }}
{{- $live := index . 1 }}
{{- if $live }}
{{- $annotations := default dict $live.metadata.annotations }}
{{- $release := get $annotations "meta.helm.sh/release-name" }}
{{- $namespace := get $annotations "meta.helm.sh/release-namespace" }}
{{- if not $release }}
{{- print "no Helm release (it was applied with kubectl or another tool)" }}
{{- else if not (and (eq $release $root.Release.Name) (eq $namespace $root.Release.Namespace)) }}
{{- printf "Helm release %s in namespace %s" $release $namespace }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Refuse a watch scope that overlaps another installation's: two operators on
one namespace would overwrite each other's settings on the same pods. Each
installation's scope is visible in its RBAC: a Role per watched namespace, or
a ClusterRole granting inferencepolicies cluster-wide. Only objects labelled
part-of=batchpilot and owned by someone else count. Rendering without a
cluster (helm template) looks up nothing and checks nothing.
*/}}
{{- define "batchpilot.validateWatchScope" -}}
{{- $rbac := "rbac.authorization.k8s.io/v1" }}
{{- $roles := list }}
{{- if .Values.watchNamespaces }}
{{- range $namespace := .Values.watchNamespaces }}
{{- $roles = concat $roles (default list (lookup $rbac "Role" $namespace "").items) }}
{{- end }}
{{- else }}
{{- /* Cluster-wide: every namespaced installation overlaps this one. */}}
{{- $roles = default list (lookup $rbac "Role" "" "").items }}
{{- end }}
{{- range $role := $roles }}
{{- /* Leader-election Roles hold Leases, not a watch scope; releases that
       both select policies by label split a namespace between them (their
       selectors must not overlap, docs/scale-out.md). */}}
{{- $splitByLabel := and $.Values.sharding.policySelector (get (default dict $role.metadata.annotations) "batchpilot.dev/policy-selector") }}
{{- if and (eq (get (default dict $role.metadata.labels) "app.kubernetes.io/part-of") "batchpilot") (not (hasSuffix "-leader-election" $role.metadata.name)) (not $splitByLabel) }}
{{- with include "batchpilot.otherOwner" (list $ $role) }}
{{- $namespace := $role.metadata.namespace }}
{{- if $.Values.watchNamespaces }}
{{- fail (printf "watchNamespaces: namespace %s is already watched by another batchpilot installation (its Role %s belongs to %s), and two operators would fight over the same pods: remove %s from this release's watchNamespaces" $namespace $role.metadata.name . $namespace) }}
{{- else }}
{{- fail (printf "watchNamespaces is empty, so this release would watch every namespace, but namespace %s is already watched by another batchpilot installation (its Role %s belongs to %s): list this release's namespaces in watchNamespaces, leaving out the ones other releases watch" $namespace $role.metadata.name .) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- range $clusterRole := default list (lookup $rbac "ClusterRole" "" "").items }}
{{- $splitByLabel := and $.Values.sharding.policySelector (get (default dict $clusterRole.metadata.annotations) "batchpilot.dev/policy-selector") }}
{{- if and (eq (get (default dict $clusterRole.metadata.labels) "app.kubernetes.io/part-of") "batchpilot") (contains "\"inferencepolicies\"" (toJson $clusterRole.rules)) (not $splitByLabel) }}
{{- with include "batchpilot.otherOwner" (list $ $clusterRole) }}
{{- fail (printf "watchNamespaces: %s already watches every namespace (its ClusterRole %s), and two operators would fight over the same pods: give that release watchNamespaces too, disjoint from this one's" . $clusterRole.metadata.name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The operator's config file: values.config verbatim, plus the settings the chart
owns because other templates depend on them (RBAC scope, container ports).
*/}}
{{- define "batchpilot.operatorConfig" -}}
{{- $owned := dict
      "namespaces" .Values.watchNamespaces
      "leader_election" true
      "lease_name" (include "batchpilot.fullname" .)
      "shard_count" (int .Values.sharding.shards)
      "policy_selector" .Values.sharding.policySelector
      "health_host" "0.0.0.0"
      "metrics_host" "0.0.0.0"
      "health_port" (int .Values.health.port)
      "metrics_port" (ternary (int .Values.metrics.port) 0 .Values.metrics.enabled) }}
{{- merge $owned (deepCopy .Values.config) | toYaml }}
{{- end }}

{{/*
What the operator does in a watched namespace, grouped by purpose. Rendered
into the cluster-wide ClusterRole, or into one Role per watched namespace.
Nothing here creates, updates or deletes a user's object.
*/}}
{{- define "batchpilot.workRules" -}}
# The policies: kopf watches them, and patches them for its finalizer and
# its last-handled-spec annotation; the operator writes their status.
- apiGroups: ["batchpilot.dev"]
  resources: ["inferencepolicies"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["batchpilot.dev"]
  resources: ["inferencepolicies/status"]
  verbs: ["patch"]
# The serving pods: watched (an index of the pods each policy selects) and
# patched only to record the applied settings in the batchpilot.dev/applied
# and batchpilot.dev/knobs annotations. No delete, no create: the operator never restarts a pod.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch"]
# A policy's spec.targetRef: read for its pod selector, never written.
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get"]
# Events explain each change and each hold (kubectl describe infpol). kopf
# posts through the core API; events.k8s.io is the same store's newer API.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- with .Values.rbac.gateTokenSecretNames }}
# The gates' admin tokens (spec.actuation.tokenSecretRef), by name, get only:
# list or watch would expose every Secret's content in the scope.
- apiGroups: [""]
  resources: ["secrets"]
  resourceNames:
    {{- toYaml . | nindent 4 }}
  verbs: ["get"]
{{- end }}
{{- end }}
