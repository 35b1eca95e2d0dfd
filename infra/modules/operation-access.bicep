// Grants the healer's operation-reader role on one watched resource group: the status URL of an
// asynchronous Compute operation is not under the scale set, so a role on the scale set alone can
// start repairs but never learn how they ended.
param roleDefinitionId string
param principalId string

resource access 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(resourceGroup().id, principalId, roleDefinitionId)
  properties: {
    roleDefinitionId: roleDefinitionId
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}
