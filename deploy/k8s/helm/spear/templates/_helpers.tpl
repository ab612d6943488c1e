{{/* Chart name, or nameOverride. */}}
{{- define "spear.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every resource name: the release name when it contains the
chart name (release "spear" gives spear-router, spear-worker: the names of
the Kustomize base), else "<release>-<chart>". */}}
{{- define "spear.fullname" -}}
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

{{- define "spear.routerName" -}}
{{- printf "%s-router" (include "spear.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "spear.workerName" -}}
{{- printf "%s-worker" (include "spear.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "spear.modelConfigName" -}}
{{- printf "%s-model" (include "spear.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "spear.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "spear.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels the selectors use (same set as the Kustomize base). */}}
{{- define "spear.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spear.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: spear
{{- end -}}

{{- define "spear.labels" -}}
{{ include "spear.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "spear.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* preStop delay + longest request + 30 s margin. */}}
{{- define "spear.terminationGracePeriodSeconds" -}}
{{- add .Values.drain.preStopSleepSeconds .Values.drain.maxRequestSeconds 30 -}}
{{- end -}}
