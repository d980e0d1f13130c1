{{/* Names ------------------------------------------------------------------------------------- */}}
{{- define "quantcore.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "quantcore.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "quantcore.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "quantcore.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Job name of a run. qat Jobs are shorter: their pods are named <job>-<index> and
     their headless Service shares the Job's name. ctx: dict root, run */}}
{{- define "quantcore.jobName" -}}
{{- $max := ternary 52 63 (eq .run.mode "qat") -}}
{{- printf "%s-%s" (include "quantcore.fullname" .root) .run.name | trunc $max | trimSuffix "-" -}}
{{- end -}}

{{- define "quantcore.labels" -}}
app.kubernetes.io/name: {{ include "quantcore.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: quantcore
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{- define "quantcore.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}
{{- end -}}

{{/* Pod security (Kubernetes "restricted" profile; not configurable apart from the ids) -------- */}}
{{- define "quantcore.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "quantcore.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* S3 settings as environment variables (boto3's standard names); credentials by Secret reference */}}
{{- define "quantcore.s3Env" -}}
{{- $s3 := .Values.s3 -}}
{{- if $s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ $s3.endpoint | quote }}
{{- end }}
{{- if $s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ $s3.region | quote }}
- name: AWS_REGION
  value: {{ $s3.region | quote }}
{{- end }}
{{- if $s3.maxAttempts }}
- name: AWS_MAX_ATTEMPTS
  value: {{ $s3.maxAttempts | quote }}
{{- end }}
{{- if $s3.retryMode }}
- name: AWS_RETRY_MODE
  value: {{ $s3.retryMode | quote }}
{{- end }}
{{- if $s3.secretName }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $s3.secretName }}
      key: {{ $s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $s3.secretName }}
      key: {{ $s3.secretAccessKeyKey }}
{{- if $s3.sessionTokenKey }}
- name: AWS_SESSION_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $s3.secretName }}
      key: {{ $s3.sessionTokenKey }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Writable scratch volumes for a read-only root filesystem. ctx: dict root, tmpSize, cacheSize, shmSize */}}
{{- define "quantcore.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .tmpSize }}
- name: cache
  emptyDir:
    sizeLimit: {{ .cacheSize }}
# DataLoader workers / the Ray object store use shared memory; the runtime default is 64 MiB.
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- if .root.Values.recipes }}
- name: recipes
  configMap:
    name: {{ include "quantcore.fullname" .root }}-recipes
{{- end }}
{{- end -}}

{{- define "quantcore.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /cache
- name: dshm
  mountPath: /dev/shm
{{- if .Values.recipes }}
- name: recipes
  mountPath: /etc/quantcore/recipes
  readOnly: true
{{- end }}
{{- end -}}

{{/* A recipe reference as passed to --recipe: inline recipes become their mounted path. ctx: dict root, ref */}}
{{- define "quantcore.recipeArg" -}}
{{- if hasKey .root.Values.recipes .ref -}}
{{- printf "/etc/quantcore/recipes/%s.yaml" .ref -}}
{{- else -}}
{{- .ref -}}
{{- end -}}
{{- end -}}

{{/* resources with the GPU count added. ctx: dict resources, gpus, gpuName */}}
{{- define "quantcore.resources" -}}
{{- $res := deepCopy (default (dict) .resources) -}}
{{- if gt (int .gpus) 0 -}}
{{- $req := deepCopy (default (dict) $res.requests) -}}
{{- $lim := deepCopy (default (dict) $res.limits) -}}
{{- $_ := set $req .gpuName (int .gpus) -}}
{{- $_ := set $lim .gpuName (int .gpus) -}}
{{- $_ := set $res "requests" $req -}}
{{- $_ := set $res "limits" $lim -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* Scheduling for a pod: GPU node selector/tolerations when it uses GPUs, plus its own.
     ctx: dict root, gpus, nodeSelector, tolerations, affinity, priorityClassName */}}
{{- define "quantcore.scheduling" -}}
{{- $gpu := .root.Values.gpu -}}
{{- $sel := dict -}}
{{- $tol := list -}}
{{- if gt (int .gpus) 0 -}}
{{- $sel = merge $sel (deepCopy $gpu.nodeSelector) -}}
{{- $tol = concat $tol $gpu.tolerations -}}
{{- end -}}
{{- $sel = mergeOverwrite $sel (deepCopy (default (dict) .nodeSelector)) -}}
{{- $tol = concat $tol (default (list) .tolerations) -}}
{{- with $sel }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tol }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}
