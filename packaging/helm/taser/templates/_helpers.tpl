{{/* Chart name, at most 63 characters (the limit of a DNS label). */}}
{{- define "taser.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of the release's objects: the release name, with the chart name unless it contains it. */}}
{{- define "taser.fullname" -}}
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

{{- define "taser.selectorLabels" -}}
app.kubernetes.io/name: {{ include "taser.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: broker
{{- end }}

{{- define "taser.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "taser.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "taser.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "taser.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* true when the client port terminates TLS, so it needs a certificate. */}}
{{- define "taser.clientTLS" -}}
{{- if and (eq .Values.broker.clientEdge "http") (not .Values.broker.plaintext) }}true{{ end }}
{{- end }}

{{- define "taser.clientSecretName" -}}
{{- default (printf "%s-client-tls" (include "taser.fullname" .)) .Values.tls.clientSecretName }}
{{- end }}

{{- define "taser.bridgeSecretName" -}}
{{- default (printf "%s-bridge-tls" (include "taser.fullname" .)) .Values.tls.bridgeSecretName }}
{{- end }}
