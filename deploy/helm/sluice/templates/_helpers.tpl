{{/* Names, truncated to 63 characters (DNS label); fullname is release-chart unless the release name contains the chart's. */}}
{{- define "sluice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sluice.fullname" -}}
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

{{/* The headless Service's name: fullname, shortened to leave room for "-headless". */}}
{{- define "sluice.headlessName" -}}
{{- printf "%s-headless" (include "sluice.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "sluice.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sluice.labels" -}}
helm.sh/chart: {{ include "sluice.chart" . }}
{{ include "sluice.selectorLabels" . }}
app.kubernetes.io/version: {{ include "sluice.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sluice.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sluice.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "sluice.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "sluice.imageTag" .) }}
{{- end }}

{{/* The ConfigMap the pipelines are mounted from ("" when they come from the repository volume). */}}
{{- define "sluice.pipelinesConfigMap" -}}
{{- if eq .Values.pipelines.source "configMap" }}
{{- default (printf "%s-pipelines" (include "sluice.fullname" . | trunc 53 | trimSuffix "-")) .Values.pipelines.existingConfigMap }}
{{- end }}
{{- end }}

{{/* The ConfigMap of a CPU tier's remote model.yaml files. */}}
{{- define "sluice.remoteModelsConfigMap" -}}
{{- printf "%s-remote-models" (include "sluice.fullname" . | trunc 49 | trimSuffix "-") }}
{{- end }}

{{- define "sluice.modelsDir" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.repository.mountPath) .Values.repository.modelsDir }}
{{- end }}

{{- define "sluice.pipelinesDir" -}}
{{- if eq .Values.pipelines.source "configMap" }}
{{- .Values.pipelines.mountPath }}
{{- else }}
{{- printf "%s/%s" (trimSuffix "/" .Values.repository.mountPath) .Values.pipelines.repositoryDir }}
{{- end }}
{{- end }}

{{/*
The pod's grace period: the kubelet sends SIGTERM after the preStop hook (if any) and
kills the container terminationGracePeriodSeconds after the deletion began, preStop time
included. sluice then keeps serving for the drain delay (not ready), waits for requests
in flight up to the shutdown timeout, unloads and exits: all of it must fit, with margin.
*/}}
{{- define "sluice.terminationGracePeriodSeconds" -}}
{{- add (int .Values.lifecycle.preStopSleepSeconds) (int .Values.drain.delaySeconds) (int .Values.drain.shutdownTimeoutSeconds) (int .Values.drain.marginSeconds) }}
{{- end }}

{{/* sluice serve's flags (the image's ENTRYPOINT is `sluice serve`). */}}
{{- define "sluice.args" -}}
{{- $s := .Values.server -}}
- {{ printf "--models=%s" (include "sluice.modelsDir" .) | quote }}
- {{ printf "--pipelines=%s" (include "sluice.pipelinesDir" .) | quote }}
- {{ printf "--http-addr=%s" (include "sluice.hostPort" (list $s.bindAddress $s.httpPort)) | quote }}
- {{ printf "--grpc-addr=%s" (include "sluice.hostPort" (list $s.bindAddress $s.grpcPort)) | quote }}
- {{ printf "--reload=%s" $s.reload | quote }}
- {{ printf "--drain-delay-s=%d" (int .Values.drain.delaySeconds) | quote }}
- {{ printf "--shutdown-timeout-s=%d" (int .Values.drain.shutdownTimeoutSeconds) | quote }}
{{- range $alias, $target := $s.modelAliases }}
- {{ printf "--model-alias=%s=%s" $alias $target | quote }}
{{- end }}
{{- range $name, $spec := $s.pools }}
- {{ printf "--pool=%s=%v" $name $spec | quote }}
{{- end }}
{{- if not (kindIs "invalid" $s.maxMessageMb) }}
- {{ printf "--max-message-mb=%d" (int $s.maxMessageMb) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $s.requestTimeoutMs) }}
- {{ printf "--request-timeout-ms=%d" (int $s.requestTimeoutMs) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $s.loadNice) }}
- {{ printf "--load-nice=%d" (int $s.loadNice) | quote }}
{{- end }}
{{- range $s.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* host:port, with brackets around an IPv6 host. Takes (list host port). */}}
{{- define "sluice.hostPort" -}}
{{- $host := index . 0 -}}
{{- if contains ":" $host }}[{{ $host }}]:{{ int (index . 1) }}{{ else }}{{ $host }}:{{ int (index . 1) }}{{ end }}
{{- end }}

{{/* resources, with the GPU limit added when gpu.count > 0. */}}
{{- define "sluice.resources" -}}
{{- $res := deepCopy (default (dict) .Values.resources) }}
{{- if gt (int .Values.gpu.count) 0 }}
{{- $limits := deepCopy (default (dict) (get $res "limits")) }}
{{- $_ := set $limits .Values.gpu.resourceName (int .Values.gpu.count) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{- define "sluice.tolerations" -}}
{{- $t := list }}
{{- range .Values.tolerations }}{{ $t = append $t . }}{{ end }}
{{- if and (gt (int .Values.gpu.count) 0) .Values.gpu.tolerateTaint }}
{{- $t = append $t (dict "key" .Values.gpu.resourceName "operator" "Exists" "effect" "NoSchedule") }}
{{- end }}
{{- if $t }}{{ toYaml $t }}{{ end }}
{{- end }}

{{/* Whether the PodDisruptionBudget is rendered: as set, or (null) when more than one replica runs. */}}
{{- define "sluice.pdbEnabled" -}}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if kindIs "bool" $pdb.enabled }}
{{- if $pdb.enabled }}true{{ end }}
{{- else if .Values.autoscaling.enabled }}
{{- if gt (int .Values.autoscaling.minReplicas) 1 }}true{{ end }}
{{- else if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}
