{{/* A list of arguments as one POSIX shell command line: words made only of safe characters stay
     as they are, anything else is single-quoted. ctx: the list */}}
{{- define "quantcore.shellJoin" -}}
{{- $quoted := list -}}
{{- range . -}}
{{- $a := toString . -}}
{{- if regexMatch "^[A-Za-z0-9_./:=@%+,-]+$" $a -}}
{{- $quoted = append $quoted $a -}}
{{- else -}}
{{- $quoted = append $quoted (printf "'%s'" (replace "'" "'\\''" $a)) -}}
{{- end -}}
{{- end -}}
{{- join " " $quoted -}}
{{- end -}}

{{/* A KubeRay RayJob (ray.io/v1) on a throw-away Ray cluster: a submitter pod runs `ray job submit`
     with the entrypoint, the driver runs on the head (no CPUs/GPUs advertised, so work lands on the
     workers), the workers do the work, and the cluster is deleted when the job finishes.
     ctx: dict
       root        the chart root context
       cfg         the values block (.Values.sweep / .Values.rayQat)
       component   app.kubernetes.io/component of the RayJob ("sweep", "qat"); pods get -submitter/-head/-worker
       entrypoint  the entrypoint as a list of arguments
       headMounts  extra volumeMounts of the head container (YAML list text, may be "")
       headVolumes extra volumes of the head pod (YAML list text, may be "") */}}
{{- define "quantcore.rayJob" -}}
{{- $root := .root -}}
{{- $cfg := .cfg -}}
{{- $w := $cfg.workers -}}
{{- $minReplicas := ternary $w.minReplicas $w.replicas (hasKey $w "minReplicas") -}}
{{- $maxReplicas := ternary $w.maxReplicas $w.replicas (hasKey $w "maxReplicas") -}}
{{- if or (lt (int $w.replicas) (int $minReplicas)) (gt (int $w.replicas) (int $maxReplicas)) }}
{{- fail (printf "%s.workers: need minReplicas (%d) <= replicas (%d) <= maxReplicas (%d)" .valuesKey (int $minReplicas) (int $w.replicas) (int $maxReplicas)) }}
{{- end }}
{{- $s3env := include "quantcore.s3Env" $root }}
apiVersion: ray.io/v1
kind: RayJob
metadata:
  name: {{ printf "%s-%s" (include "quantcore.fullname" $root) $cfg.name | trunc 47 | trimSuffix "-" }}
  labels:
    {{- include "quantcore.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  entrypoint: {{ include "quantcore.shellJoin" .entrypoint | quote }}
  submissionMode: {{ $cfg.submissionMode }}
  shutdownAfterJobFinishes: {{ $cfg.shutdownAfterJobFinishes }}
  ttlSecondsAfterFinished: {{ int $cfg.ttlSecondsAfterFinished }}
  activeDeadlineSeconds: {{ int $cfg.activeDeadlineSeconds }}
  backoffLimit: {{ int $cfg.backoffLimit }}
  {{- if eq $cfg.submissionMode "K8sJobMode" }}
  submitterPodTemplate:
    metadata:
      labels:
        {{- include "quantcore.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}-submitter
    spec:
      serviceAccountName: {{ include "quantcore.serviceAccountName" $root }}
      automountServiceAccountToken: false
      restartPolicy: Never
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "quantcore.podSecurityContext" $root | nindent 8 }}
      containers:
        - name: ray-job-submitter
          image: {{ include "quantcore.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          resources:
            {{- toYaml $cfg.submitter.resources | nindent 12 }}
          securityContext:
            {{- include "quantcore.containerSecurityContext" $root | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 1Gi
  {{- end }}
  rayClusterSpec:
    rayVersion: {{ $cfg.rayVersion | quote }}
    enableInTreeAutoscaling: false
    headGroupSpec:
      # The head runs the driver only: no CPUs/GPUs advertised, so the work lands on the workers.
      rayStartParams:
        dashboard-host: "0.0.0.0"
        num-cpus: "0"
        num-gpus: "0"
      template:
        metadata:
          labels:
            {{- include "quantcore.labels" $root | nindent 12 }}
            app.kubernetes.io/component: {{ .component }}-head
        spec:
          serviceAccountName: {{ include "quantcore.serviceAccountName" $root }}
          automountServiceAccountToken: false
          enableServiceLinks: false
          {{- with $root.Values.imagePullSecrets }}
          imagePullSecrets:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          securityContext:
            {{- include "quantcore.podSecurityContext" $root | nindent 12 }}
          {{- include "quantcore.scheduling" (dict "root" $root "gpus" 0 "nodeSelector" $cfg.head.nodeSelector "tolerations" $cfg.head.tolerations "affinity" $cfg.head.affinity) | nindent 10 }}
          containers:
            - name: ray-head
              image: {{ include "quantcore.image" $root }}
              imagePullPolicy: {{ $root.Values.image.pullPolicy }}
              ports:
                - name: gcs-server
                  containerPort: 6379
                - name: dashboard
                  containerPort: 8265
                - name: client
                  containerPort: 10001
              {{- if $s3env }}
              env:
                {{- $s3env | nindent 16 }}
              {{- end }}
              resources:
                {{- toYaml $cfg.head.resources | nindent 16 }}
              securityContext:
                {{- include "quantcore.containerSecurityContext" $root | nindent 16 }}
              volumeMounts:
                {{- include "quantcore.scratchMounts" $root | nindent 16 }}
                {{- with .headMounts }}
                {{- . | nindent 16 }}
                {{- end }}
          volumes:
            {{- include "quantcore.scratchVolumes" (dict "root" $root "tmpSize" $cfg.head.tmpSize "cacheSize" $cfg.head.cacheSize "shmSize" $cfg.head.shmSize) | nindent 12 }}
            {{- with .headVolumes }}
            {{- . | nindent 12 }}
            {{- end }}
    workerGroupSpecs:
      - groupName: {{ $w.groupName }}
        replicas: {{ int $w.replicas }}
        minReplicas: {{ int $minReplicas }}
        maxReplicas: {{ int $maxReplicas }}
        # KubeRay derives num-cpus / num-gpus / memory from the container limits.
        rayStartParams: {}
        template:
          metadata:
            labels:
              {{- include "quantcore.labels" $root | nindent 14 }}
              app.kubernetes.io/component: {{ .component }}-worker
          spec:
            serviceAccountName: {{ include "quantcore.serviceAccountName" $root }}
            automountServiceAccountToken: false
            enableServiceLinks: false
            {{- with $root.Values.imagePullSecrets }}
            imagePullSecrets:
              {{- toYaml . | nindent 14 }}
            {{- end }}
            securityContext:
              {{- include "quantcore.podSecurityContext" $root | nindent 14 }}
            {{- include "quantcore.scheduling" (dict "root" $root "gpus" $w.gpus "nodeSelector" $w.nodeSelector "tolerations" $w.tolerations "affinity" $w.affinity) | nindent 12 }}
            containers:
              - name: ray-worker
                image: {{ include "quantcore.image" $root }}
                imagePullPolicy: {{ $root.Values.image.pullPolicy }}
                {{- if $s3env }}
                env:
                  {{- $s3env | nindent 18 }}
                {{- end }}
                resources:
                  {{- include "quantcore.resources" (dict "resources" $w.resources "gpus" $w.gpus "gpuName" $root.Values.gpu.resourceName) | nindent 18 }}
                securityContext:
                  {{- include "quantcore.containerSecurityContext" $root | nindent 18 }}
                volumeMounts:
                  {{- include "quantcore.scratchMounts" $root | nindent 18 }}
            volumes:
              {{- include "quantcore.scratchVolumes" (dict "root" $root "tmpSize" $w.tmpSize "cacheSize" $w.cacheSize "shmSize" $w.shmSize) | nindent 14 }}
{{- end -}}
