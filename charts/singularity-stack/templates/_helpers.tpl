{{- define "singularity-stack.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "singularity-stack.labels" -}}
app.kubernetes.io/name: singularity-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "singularity-stack.selector" -}}
app.kubernetes.io/name: singularity-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "singularity-stack.serviceAccountName" -}}
{{- default (include "singularity-stack.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The rules the operator needs on a stack's namespace: no pods/exec, nothing cluster-wide but the CRD. */}}
{{- define "singularity-stack.namespacedRules" -}}
- apiGroups: ["singularity.dev"]
  resources: ["singularitystacks"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["singularity.dev"]
  resources: ["singularitystacks/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: [""]
  resources: ["secrets", "services", "serviceaccounts", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "delete"]   # a managed PostgreSQL's volume, dropped by deletionPolicy Delete
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# spec.genesis.sandbox pod: a RoleBinding of the genesis-jobs ClusterRole to the stack's Genesis, never a Pod write
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["clusterroles"]
  verbs: ["bind"]
  resourceNames: ["singularity-genesis-jobs"]
{{- end -}}
