<#
.SYNOPSIS
  Installs vmss-healer-agent.ps1 as a scheduled task that starts at boot and restarts on failure.
  Used by the Custom Script Extension (fileUris: vmss-healer-agent.ps1, install.ps1):

    powershell -ExecutionPolicy Bypass -File install.ps1 -Topic https://<topic>/api/events -HealthUrl http://127.0.0.1/healthz
#>
param(
    [Parameter(Mandatory = $true)][string]$Topic,
    [string]$HealthUrl = '',
    [string]$HealthCommand = '',
    [string]$HealthTimeout = '5',
    [string]$Interval = '60',
    [ValidateSet('eventgrid', 'cloudevents')][string]$Schema = 'eventgrid',
    [switch]$Attest
)
$ErrorActionPreference = 'Stop'
if ($HealthUrl -and $HealthCommand) { throw 'pass -HealthUrl or -HealthCommand, not both' }

$programDir = Join-Path $env:ProgramFiles 'vmss-healer'
$stateDir = Join-Path $env:ProgramData 'vmss-healer'
$null = New-Item -ItemType Directory -Force -Path $programDir, $stateDir
Copy-Item -Force (Join-Path $PSScriptRoot 'vmss-healer-agent.ps1') $programDir

# Same format as the Linux agent.env: KEY="value" with \\ and \" escaped.
function Format-Value([string]$v) { '"' + $v.Replace('\', '\\').Replace('"', '\"') + '"' }
$lines = @('# written by vmss-healer install.ps1', "HEALER_TOPIC_ENDPOINT=$(Format-Value $Topic)")
if ($HealthUrl) { $lines += "HEALER_HEALTH_URL=$(Format-Value $HealthUrl)" }
if ($HealthCommand) { $lines += "HEALER_HEALTH_COMMAND=$(Format-Value $HealthCommand)" }
$lines += "HEALER_HEALTH_TIMEOUT=$(Format-Value $HealthTimeout)", "HEALER_INTERVAL=$(Format-Value $Interval)", "HEALER_SCHEMA=$(Format-Value $Schema)", "HEALER_ATTEST=$(Format-Value $(if ($Attest) { 'true' } else { 'false' }))"
Set-Content -Path (Join-Path $stateDir 'agent.env') -Value $lines -Encoding UTF8

if (-not [System.Diagnostics.EventLog]::SourceExists('vmss-healer-agent')) {
    New-EventLog -LogName Application -Source 'vmss-healer-agent'
}

# Least privilege: LOCAL SERVICE can reach IMDS and read ProgramData; it needs nothing else.
$action = New-ScheduledTaskAction -Execute 'powershell.exe' `
    -Argument "-NoProfile -NonInteractive -ExecutionPolicy Bypass -File `"$programDir\vmss-healer-agent.ps1`" run"
# Task Scheduler restarts a task that fails to start, not one that exits after it started: the
# second trigger is the watchdog. Every 5 minutes it starts the agent again, and while the agent
# runs the new instance is ignored (MultipleInstances IgnoreNew), so a dead agent is back within 5
# minutes. (No -RepetitionDuration: without it the repetition lasts indefinitely.)
$triggers = @(
    (New-ScheduledTaskTrigger -AtStartup),
    (New-ScheduledTaskTrigger -Once -At (Get-Date) -RepetitionInterval (New-TimeSpan -Minutes 5))
)
$principal = New-ScheduledTaskPrincipal -UserId 'NT AUTHORITY\LOCAL SERVICE' -LogonType ServiceAccount
$settings = New-ScheduledTaskSettingsSet -RestartCount 999 -RestartInterval (New-TimeSpan -Minutes 1) `
    -MultipleInstances IgnoreNew -ExecutionTimeLimit ([TimeSpan]::Zero) -StartWhenAvailable `
    -AllowStartIfOnBatteries -DontStopIfGoingOnBatteries
Register-ScheduledTask -TaskName 'vmss-healer-agent' -Action $action -Trigger $triggers -Principal $principal `
    -Settings $settings -Force | Out-Null
Start-ScheduledTask -TaskName 'vmss-healer-agent'
Write-Output 'vmss-healer-agent installed and started; logs: Application event log, source vmss-healer-agent'
