{{/* Chart name, truncated to 63 characters (a label value's limit). */}}
{{- define "qmodel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name: "<release>-<chart>", or just the release name when it already contains the chart
name. Truncated to 63 characters: it names Services, whose names are DNS labels.
*/}}
{{- define "qmodel.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "qmodel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object the chart creates. */}}
{{- define "qmodel.labels" -}}
helm.sh/chart: {{ include "qmodel.chart" . }}
app.kubernetes.io/name: {{ include "qmodel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: qmodel
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Selector labels of the operator's pod (immutable in a Deployment: never change them). The
component keeps them apart from the runtime pods of a model named like the release, which carry
app.kubernetes.io/name: qmodel and app.kubernetes.io/instance: <model>.
*/}}
{{- define "qmodel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qmodel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "qmodel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "qmodel.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The namespaces the operator watches (not with watch.clusterWide): a list, as JSON. */}}
{{- define "qmodel.watchNamespaces" -}}
{{- $namespaces := .Values.watch.namespaces | default (list .Release.Namespace) -}}
{{- toJson (uniq $namespaces) -}}
{{- end -}}

{{/* An image reference from {registry, repository, tag, digest}; the digest wins over the tag. */}}
{{- define "qmodel.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- $repo := ternary (printf "%s/%s" $image.registry $image.repository) $image.repository (ne $image.registry "") -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $repo $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}
