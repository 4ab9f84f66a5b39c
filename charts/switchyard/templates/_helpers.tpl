{{/* The release's full name, at most 63 characters. */}}
{{- define "switchyard.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: switchyard-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "switchyard.labels" -}}
{{ include "switchyard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: switchyard
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "switchyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "switchyard.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The rules the operator needs wherever it reconciles pools; shared by the ClusterRole
     and the per-namespace Roles. Each verb is one the operator's code uses. */}}
{{/* The namespaces the operator manages when not cluster-wide, as a JSON list. */}}
{{- define "switchyard.watchNamespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- toJson .Values.watchNamespaces -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{- define "switchyard.rules" -}}
# ProviderPools and RoutingPolicies: watched, and their status written (server-side apply).
- apiGroups: ["switchyard.dev"]
  resources: ["providerpools", "routingpolicies"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["switchyard.dev"]
  # get: the gateways' Role grants it, and RBAC lets the operator grant only what it holds.
  resources: ["providerpools/status", "routingpolicies/status"]
  verbs: ["get", "patch"]
# The children of each pool: watched (the operator's label only) into caches, applied,
# and pruned when a region goes away. get: a child the cache lacks is read before it
# would be created, since an object of that name may be someone else's.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Gateway pods, read only: a region whose pods cannot be scheduled or started says why.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Events when a condition flips.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Secrets: existence and keys, for the policies' ResolvedRefs (values are never copied).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
{{- end -}}
